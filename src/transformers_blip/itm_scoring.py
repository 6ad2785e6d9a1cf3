"""How well texts match their images: the ITM head's match probability and the ITC cosine similarity.

One scorer serves every place that scores captions: CapFilt's filter (`capfilt.bootstrap`), ITM re-ranking of an
image search (`retrieval_index.ImageIndex.search`) and `blip caption --score-with` (`batch_captioning`). It encodes
each image once and projects its cross-attention keys/values once for all of its texts, pads every text to the same
length and runs the ITM head and ITC projections in float64, so that a text's score does not depend on the batch it
was scored in (CapFilt's outputs are byte-identical however the work is split).

`model` is a BLIP model with an ITM head and ITC projections (`BlipForImageTextRetrieval`, `BlipForPreTraining`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data.text import pre_caption
from .modeling_blip import image_grounded_encoding

QUERY_MAX_WORDS = 30  # BLIP's retrieval recipe cleans texts to 30 words and 35 tokens
QUERY_MAX_TOKENS = 35


def _float64_linear(layer: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """`layer(inputs)` in float64. A float32 matrix product rounds differently for different batch sizes (its
    blocking changes), and a score must not depend on the batch its text was scored in; the heads are small."""
    return torch.nn.functional.linear(inputs.double(), layer.weight.double(), layer.bias.double())


def _exact_itc_feature(projection: torch.nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """`modeling_blip.itc_feature` with the projection in float64 (see `_float64_linear`), (B, E)."""
    return torch.nn.functional.normalize(_float64_linear(projection, states[:, 0]), dim=-1)


@torch.inference_mode()
def score_texts(
    model: Any, tokenizer: Any, pixel_values: torch.Tensor, texts: Sequence[Sequence[str]], max_length: int = 35
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM match probabilities and ITC similarities, each (B, T) float32, of T texts per image (the same T for all).

    Args:
        model: a BLIP model with `itm_head`, `text_proj` and `vision_proj`.
        tokenizer: the model's tokenizer; texts are used as given (clean them first).
        pixel_values: (B, 3, H, W), moved to the model's device and dtype here.
        texts: B sequences of T texts, `texts[b]` those of image b.
        max_length: every text is padded (and truncated) to this many tokens.
    """
    if not hasattr(model, "itm_head"):
        raise ValueError(f"{type(model).__name__} has no ITM head: use BlipForImageTextRetrieval")
    num_images = pixel_values.shape[0]
    if len(texts) != num_images or not num_images:
        raise ValueError(f"score_texts takes one sequence of texts per image: {len(texts)} for {num_images} images")
    per_image = len(texts[0])
    if any(len(own) != per_image for own in texts):
        raise ValueError("score_texts takes the same number of texts for every image")
    parameter = next(model.parameters())
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    flat = [text for own in texts for text in own]
    encoded = tokenizer(flat, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    input_ids = encoded["input_ids"].to(parameter.device)  # (B * T, L)
    attention_mask = encoded["attention_mask"].to(parameter.device)
    image_embeds = model.vision_model(pixel_values).last_hidden_state  # (B, 1 + N, D_v)
    image_key_values = model.text_encoder.image_key_values(image_embeds)
    multimodal = image_grounded_encoding(
        model.text_encoder, input_ids, attention_mask, image_key_values=image_key_values
    ).last_hidden_state  # (B * T, L, D_t)
    itm_logits = _float64_linear(model.itm_head, multimodal[:, 0])  # (B * T, 2)
    itm_probability = itm_logits.softmax(dim=-1)[:, 1].float()  # (B * T,)
    text_states = model.text_encoder(input_ids, attention_mask=attention_mask, mode="text").last_hidden_state
    text_feat = _exact_itc_feature(model.text_proj, text_states).view(num_images, per_image, -1)  # (B, T, E)
    image_feat = _exact_itc_feature(model.vision_proj, image_embeds)  # (B, E)
    # A product and a sum per row, not a batched matmul, whose blocking (and last bits) would depend on B.
    itc_similarity = (image_feat[:, None, :] * text_feat).sum(dim=-1).float()  # (B, T)
    return itm_probability.view(num_images, per_image), itc_similarity


def itm_match_probabilities(
    model: Any, processor: Any, pixel_values: torch.Tensor, texts: Sequence[str]
) -> torch.Tensor:
    """The ITM match probability of each text with its image, (len(texts),) float32 on the CPU, texts cleaned and
    tokenized as BLIP's retrieval recipe does (30 words, 35 tokens).

    `texts` holds the same number of texts for every image of `pixel_values` (B, 3, H, W), grouped by image: B texts
    pair one each, B * n pair n each.
    """
    num_images = pixel_values.shape[0]
    if not num_images or len(texts) % num_images:
        raise ValueError(f"{len(texts)} texts do not group evenly over {num_images} images")
    per_image = len(texts) // num_images
    cleaned = [pre_caption(text, QUERY_MAX_WORDS) for text in texts]
    grouped = [cleaned[index * per_image : (index + 1) * per_image] for index in range(num_images)]
    itm_probability, _ = score_texts(model, processor.tokenizer, pixel_values, grouped, QUERY_MAX_TOKENS)
    return itm_probability.flatten().cpu()


__all__ = ["QUERY_MAX_TOKENS", "QUERY_MAX_WORDS", "itm_match_probabilities", "score_texts"]
