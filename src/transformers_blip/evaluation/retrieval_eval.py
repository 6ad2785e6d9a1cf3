"""Image-text retrieval as BLIP evaluates it (`evaluation` in the original's `train_retrieval.py`), batched.

The ITC cosine similarity of every image with every text picks, for each image, its `k_test` best texts and, for each
text, its `k_test` best images; each such pair is re-scored as ITM match logit + ITC similarity, every other cell is
-100. Where the original runs one ITM forward per query and projects an image's states into cross-attention keys and
values once per candidate, here:

- the ViT and the unimodal text encoder run once per image and per text;
- a pair that is a candidate in both directions is scored once (its score is the same in both);
- the pairs are grouped by image, so that up to `_TEXTS_PER_IMAGE_ROW` texts read one copy of an image's keys and
  values (the text model's grouped cross-attention, as generation uses for beams);
- the pairs of many images go through the ITM encoder together, at most `max_pairs_per_forward` at a time, texts
  trimmed to the longest of the batch, and its last layer computes the `[ENC]` row alone, all the ITM head reads;
- under `torchrun` / `accelerate launch` each rank encodes a slice of the images and texts and scores the pairs of its
  images; the features and the pair scores are gathered, so every rank returns the full matrices, as one process does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import load_image, pre_caption
from ..losses import gather_without_grad, rank_and_world_size
from ..modeling_blip import itc_feature, replace_first_token
from ..modeling_med import BlipTextLayer, additive_mask
from ..training.callbacks import unwrap_model
from .retrieval_metrics import retrieval_recall

# Texts that share one copy of an image's cross-attention keys/values in a forward. Larger rows project an image's
# states less often; an image whose candidates do not fill its last row pads it, so larger rows also waste more.
_TEXTS_PER_IMAGE_ROW = 32
UNRANKED_SCORE = -100.0  # the original's score of a pair outside the top k
_RETRIEVAL_MODULES = ("vision_model", "vision_proj", "text_encoder", "text_proj", "itm_head")


def _rank_slice(count: int, rank: int, world_size: int) -> slice:
    """The contiguous share of `count` items that `rank` handles; the shares of all ranks differ by at most one."""
    return slice(count * rank // world_size, count * (rank + 1) // world_size)


def _slice_sizes(count: int, world_size: int) -> list[int]:
    shares = [_rank_slice(count, rank, world_size) for rank in range(world_size)]
    return [share.stop - share.start for share in shares]


def _image_batch(pixel_values: torch.Tensor | Sequence[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Images `start:stop` as one (B, 3, H, W) tensor; a sequence is read item by item (a lazy dataset view)."""
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values[start:stop]
    return torch.stack([pixel_values[index] for index in range(start, stop)])


def _encode_images(
    model: nn.Module, pixel_values: torch.Tensor | Sequence[torch.Tensor], share: slice, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT states (B, 1+N, D_v) and ITC features (B, E) of the images in `share`."""
    device = next(model.parameters()).device
    image_embeds, image_feat = [], []
    for start in range(share.start, share.stop, batch_size):
        batch = _image_batch(pixel_values, start, min(start + batch_size, share.stop)).to(device)
        states = model.vision_model(batch).last_hidden_state  # (b, 1+N, D_v)
        image_embeds.append(states)
        image_feat.append(itc_feature(model.vision_proj, states).float())
    if not image_embeds:  # more ranks than images
        return torch.empty(0, device=device), torch.empty(0, model.vision_proj.out_features, device=device)
    return torch.cat(image_embeds), torch.cat(image_feat)


def _encode_texts(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, share: slice, batch_size: int
) -> torch.Tensor:
    """ITC features (B, E) of the texts in `share`, from the unimodal text encoder."""
    device = next(model.parameters()).device
    text_feat = [torch.empty(0, model.text_proj.out_features, device=device)]
    for start in range(share.start, share.stop, batch_size):
        stop = min(start + batch_size, share.stop)
        states = model.text_encoder(
            input_ids[start:stop].to(device), attention_mask=attention_mask[start:stop].to(device), mode="text"
        ).last_hidden_state
        text_feat.append(itc_feature(model.text_proj, states).float())
    return torch.cat(text_feat)


def _candidate_pairs(similarity: torch.Tensor, k_test: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k candidates both ways and the pairs to score, each pair once.

    Returns `texts_of_image` (I, k_t), `images_of_text` (T, k_i) and the sorted keys `image * T + text` of every pair
    that is a candidate in at least one direction: sorted keys group the pairs by image.
    """
    num_images, num_texts = similarity.shape
    texts_of_image = similarity.topk(min(k_test, num_texts), dim=1).indices  # (I, k_t)
    images_of_text = similarity.t().topk(min(k_test, num_images), dim=1).indices  # (T, k_i)
    i2t_keys = torch.arange(num_images, device=similarity.device)[:, None] * num_texts + texts_of_image
    t2i_keys = images_of_text * num_texts + torch.arange(num_texts, device=similarity.device)[:, None]
    pair_keys = torch.unique(torch.cat([i2t_keys.flatten(), t2i_keys.flatten()]))  # sorted
    return texts_of_image, images_of_text, pair_keys


def _image_rows(pair_images: torch.Tensor, num_images: int, row_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lays pairs sorted by image (image index per pair, P) into rows of `row_width` slots that share one image.

    Returns each row's image (R,) and each pair's flat slot `row * row_width + column` (P,); an image's last row is
    padded when its pair count is not a multiple of `row_width`.
    """
    pairs_per_image = torch.bincount(pair_images, minlength=num_images)  # (I,)
    rows_per_image = (pairs_per_image + row_width - 1) // row_width  # (I,)
    row_images = torch.repeat_interleave(torch.arange(num_images, device=pair_images.device), rows_per_image)  # (R,)
    first_pair = torch.cumsum(pairs_per_image, 0) - pairs_per_image  # (I,) position of each image's first pair
    first_slot = (torch.cumsum(rows_per_image, 0) - rows_per_image) * row_width  # (I,) its first row's first slot
    rank_in_image = torch.arange(pair_images.shape[0], device=pair_images.device) - first_pair[pair_images]  # (P,)
    return row_images, first_slot[pair_images] + rank_in_image


def _first_row_of_last_layer(
    layer: BlipTextLayer,
    hidden_states: torch.Tensor,
    self_mask: torch.Tensor | None,
    image_key_value: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """`layer`'s output (B, 1, D) at the first position only: every position is a key of the self-attention, but only
    the first is a query, crosses to the image and goes through the feed-forward."""
    attention = layer.attention.self
    batch_size, _, width = hidden_states.shape
    query = attention.split_heads(attention.query(hidden_states[:, :1]))  # (B, H, 1, d)
    key, value = attention.project_key_value(hidden_states)  # (B, H, L, d)
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=self_mask, scale=attention.scaling)
    first = layer.attention.output(attended.transpose(1, 2).reshape(batch_size, 1, width), hidden_states[:, :1])
    first = layer.crossattention(first, key_value=image_key_value)  # (B, 1, D), image tokens all attended
    return layer.output(layer.intermediate(first), first)


def _row_match_logits(
    model: nn.Module, row_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """ITM match logits (B,) of texts (B, L) read against row images (R, 1+N, D_v), B / R consecutive texts a row.

    The image-grounded encoding of `image_grounded_encoding`, except that the last layer computes the `[ENC]` row
    alone: it is all the ITM head reads, and the other rows would be a layer of work thrown away.
    """
    text_encoder = model.text_encoder
    input_ids = replace_first_token(input_ids, text_encoder.config.encoder_token_id)
    hidden_states = text_encoder.embeddings(input_ids)  # (B, L, D)
    self_mask = None
    if not bool(attention_mask.all()):
        self_mask = additive_mask(attention_mask[:, None, None, :], hidden_states.dtype)  # (B, 1, 1, L)
    image_key_values = text_encoder.image_key_values(row_embeds)  # once per row, read by its B / R texts
    *layers, last_layer = text_encoder.encoder.layer
    for layer, image_key_value in zip(layers, image_key_values.key_values):
        hidden_states = layer(hidden_states, self_mask, image_key_value)
    enc_states = _first_row_of_last_layer(last_layer, hidden_states, self_mask, image_key_values.key_values[-1])
    return model.itm_head(enc_states[:, 0])[:, 1].float()


def _itm_match_logits(
    model: nn.Module,
    image_embeds: torch.Tensor,
    pair_images: torch.Tensor,
    pair_texts: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_pairs_per_forward: int,
) -> torch.Tensor:
    """ITM match logits (P,) of pairs sorted by image; `pair_images` index `image_embeds` (B_img, 1+N, D_v)."""
    num_pairs = pair_images.shape[0]
    if num_pairs == 0:
        return torch.empty(0, device=image_embeds.device)
    row_width = min(_TEXTS_PER_IMAGE_ROW, max_pairs_per_forward, int(torch.bincount(pair_images).max()))
    row_images, pair_slots = _image_rows(pair_images, image_embeds.shape[0], row_width)
    # A padding slot reads any text (the first pair's): its logit is computed and never read.
    slot_texts = torch.full((row_images.shape[0] * row_width,), int(pair_texts[0]), device=pair_texts.device)
    slot_texts[pair_slots] = pair_texts
    slot_texts = slot_texts.view(-1, row_width)  # (R, row_width)

    rows_per_forward = max(1, max_pairs_per_forward // row_width)
    device = image_embeds.device
    slot_logits = []
    for start in range(0, row_images.shape[0], rows_per_forward):
        texts = slot_texts[start : start + rows_per_forward].flatten()  # (rows * row_width,) grouped by row
        mask = attention_mask[texts].to(device)
        length = int(mask.any(dim=0).nonzero().max()) + 1  # the longest text of this forward
        slot_logits.append(
            _row_match_logits(
                model,
                image_embeds[row_images[start : start + rows_per_forward]],
                input_ids[texts, :length].to(device),
                mask[:, :length],
            )
        )
    return torch.cat(slot_logits)[pair_slots]


def _fill_scores(
    candidates: torch.Tensor,
    pair_keys: torch.Tensor,
    pair_scores: torch.Tensor,
    num_columns: int,
    num_texts: int,
    queries_are_images: bool,
) -> torch.Tensor:
    """(Q, C) scores of each query's candidates (Q, k) read from the scored pairs; every other cell is -100."""
    queries = torch.arange(candidates.shape[0], device=candidates.device)[:, None].expand_as(candidates)  # (Q, k)
    images, texts = (queries, candidates) if queries_are_images else (candidates, queries)
    positions = torch.searchsorted(pair_keys, images * num_texts + texts)  # (Q, k): each pair's place among the keys
    scores = torch.full((candidates.shape[0], num_columns), UNRANKED_SCORE, device=candidates.device)
    scores.scatter_(1, candidates, pair_scores[positions])
    return scores


@torch.no_grad()
def retrieval_scores(
    model: nn.Module,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    k_test: int = 128,
    batch_size: int = 64,
    max_pairs_per_forward: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's retrieval scores: ITC similarity for every pair, the top `k_test` of each image and of each text
    re-scored as ITM match logit (before softmax) + ITC similarity, -100 elsewhere.

    Args:
        model: a model with `vision_model`, `vision_proj`, `text_encoder`, `text_proj` and `itm_head`
            ([`BlipForImageTextRetrieval`], [`BlipForPreTraining`]), possibly wrapped (DDP, accelerate).
        pixel_values: the I images, a (I, 3, H, W) tensor or a sequence of (3, H, W) tensors read as needed.
        input_ids: (T, L) tokenized texts, `[CLS]` first as the tokenizer gives them (`[ENC]` is put in for ITM).
        attention_mask: (T, L), 1 for real tokens; all ones when left out.
        k_test: candidates re-ranked per query; more than there are candidates means all of them.
        batch_size: images and texts per forward of the unimodal encoders.
        max_pairs_per_forward: image-text pairs per forward of the ITM encoder: bounds its memory.

    Returns:
        `score_i2t` (I, T) and `score_t2i` (T, I), float32, on the model's device. Under a process group each rank
        encodes and scores its share and all ranks return the same full matrices.
    """
    model = unwrap_model(model)
    _check_arguments(model, pixel_values, input_ids, attention_mask, k_test, batch_size, max_pairs_per_forward)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        return _retrieval_scores(
            model, pixel_values, input_ids, attention_mask, k_test, batch_size, max_pairs_per_forward
        )
    finally:
        model.train(was_training)


def _check_arguments(
    model: nn.Module,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    k_test: int,
    batch_size: int,
    max_pairs_per_forward: int,
) -> None:
    """Refuses what the scoring cannot use, naming the argument."""
    missing = [name for name in _RETRIEVAL_MODULES if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} has no {', '.join(missing)}: retrieval scores need ITC encoders and the ITM head "
            "(BlipForImageTextRetrieval or BlipForPreTraining)"
        )
    if len(pixel_values) == 0:
        raise ValueError("pixel_values holds no image")
    if input_ids.ndim != 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be (T, L) with at least one text, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids {tuple(input_ids.shape)}"
        )
    for name, value in (
        ("k_test", k_test),
        ("batch_size", batch_size),
        ("max_pairs_per_forward", max_pairs_per_forward),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _retrieval_scores(
    model: nn.Module,
    pixel_values: torch.Tensor | Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k_test: int,
    batch_size: int,
    max_pairs_per_forward: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    rank, world_size = rank_and_world_size()
    num_images, num_texts = len(pixel_values), input_ids.shape[0]
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    own_images = _rank_slice(num_images, rank, world_size)

    image_embeds, own_image_feat = _encode_images(model, pixel_values, own_images, batch_size)
    image_feat = gather_without_grad(own_image_feat, _slice_sizes(num_images, world_size))  # (I, E)
    own_text_feat = _encode_texts(
        model, input_ids, attention_mask, _rank_slice(num_texts, rank, world_size), batch_size
    )
    text_feat = gather_without_grad(own_text_feat, _slice_sizes(num_texts, world_size))  # (T, E)
    similarity = image_feat @ text_feat.t()  # (I, T) plain cosine, no temperature, as the original evaluates

    texts_of_image, images_of_text, pair_keys = _candidate_pairs(similarity, k_test)
    # Every rank holds the same pair keys; rank r scores those of its images, a contiguous run of the sorted keys.
    image_bounds = [_rank_slice(num_images, r, world_size).start for r in range(world_size)] + [num_images]
    key_bounds = torch.searchsorted(pair_keys, torch.tensor(image_bounds, device=device) * num_texts).tolist()
    own_keys = pair_keys[key_bounds[rank] : key_bounds[rank + 1]]
    own_logits = _itm_match_logits(
        model,
        image_embeds,
        own_keys // num_texts - own_images.start,
        own_keys % num_texts,
        input_ids,
        attention_mask,
        max_pairs_per_forward,
    )
    pair_sizes = [key_bounds[r + 1] - key_bounds[r] for r in range(world_size)]
    pair_logits = gather_without_grad(own_logits, pair_sizes)  # (P,) in key order
    pair_scores = pair_logits + similarity.flatten()[pair_keys]  # (P,)

    score_i2t = _fill_scores(texts_of_image, pair_keys, pair_scores, num_texts, num_texts, queries_are_images=True)
    score_t2i = _fill_scores(images_of_text, pair_keys, pair_scores, num_images, num_texts, queries_are_images=False)
    return score_i2t, score_t2i


class _SplitImages(Sequence):
    """An evaluation split's images, decoded by the project's decoder (`load_image`, which names a broken file) and
    transformed one at a time as they are needed: every image counts in recall, so a broken one stops the evaluation
    rather than being skipped."""

    def __init__(self, dataset: Any, image_column: str, image_transform: Callable[[Any], torch.Tensor]):
        self.dataset, self.image_column, self.image_transform = dataset, image_column, image_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.image_transform(load_image(self.dataset[index][self.image_column]))


def _dataset_captions(dataset: Any, captions_column: str) -> list[list[str]]:
    """Each row's captions; a `datasets.Dataset` gives the column without decoding its images."""
    if hasattr(dataset, "column_names"):
        if captions_column not in dataset.column_names:
            raise ValueError(f"the dataset has no column {captions_column!r}; its columns: {dataset.column_names}")
        return list(dataset[captions_column])
    return [row[captions_column] for row in dataset]


def retrieval_texts(
    dataset: Any, max_words: int = 30, captions_column: str = "captions"
) -> tuple[list[str], list[int]]:
    """The cleaned captions (`pre_caption(max_words)`) of a split `{image, captions: list[str]}`, image by image, and
    the index of each one's image."""
    texts, text_to_image = [], []
    for image_index, captions in enumerate(_dataset_captions(dataset, captions_column)):
        if isinstance(captions, str) or not captions:
            raise ValueError(f"row {image_index}: {captions_column!r} must be a non-empty list of captions")
        texts += [pre_caption(caption, max_words) for caption in captions]
        text_to_image += [image_index] * len(captions)
    return texts, text_to_image


@dataclass
class SplitRetrievalScores:
    """`split_retrieval_scores`' answer: the (I, T) and (T, I) score matrices, the cleaned texts and each text's
    image index."""

    score_i2t: torch.Tensor
    score_t2i: torch.Tensor
    texts: list[str]
    text_to_image: list[int]


def split_retrieval_scores(
    model: nn.Module,
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    image_transform: Callable[[Any], torch.Tensor],
    k_test: int = 128,
    max_length: int = 35,
    max_words: int = 30,
    image_column: str = "image",
    captions_column: str = "captions",
    batch_size: int = 64,
    max_pairs_per_forward: int = 1024,
) -> SplitRetrievalScores:
    """`retrieval_scores` of a split `{image, captions}` such as a Karpathy test split: captions cleaned with
    `pre_caption(max_words)` and tokenized to at most `max_length` tokens (the original's 30 words and 35 tokens),
    images decoded and put through `image_transform` (PIL image -> (3, H, W)) as they are needed."""
    texts, text_to_image = retrieval_texts(dataset, max_words, captions_column)
    encoded = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    score_i2t, score_t2i = retrieval_scores(
        model,
        _SplitImages(dataset, image_column, image_transform),
        encoded["input_ids"],
        encoded["attention_mask"],
        k_test=k_test,
        batch_size=batch_size,
        max_pairs_per_forward=max_pairs_per_forward,
    )
    return SplitRetrievalScores(score_i2t, score_t2i, texts, text_to_image)


def evaluate_retrieval(
    model: nn.Module,
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    image_transform: Callable[[Any], torch.Tensor],
    k_test: int = 128,
    max_length: int = 35,
    max_words: int = 30,
    ks: Sequence[int] = (1, 5, 10),
    image_column: str = "image",
    captions_column: str = "captions",
    batch_size: int = 64,
    max_pairs_per_forward: int = 1024,
) -> dict[str, float]:
    """Recall@K (percent) of BLIP's retrieval, ITC then ITM re-ranking, on a split `{image, captions: list[str]}`
    (`split_retrieval_scores`): `txt_r{k}`, `img_r{k}`, the means and `r_mean`."""
    scores = split_retrieval_scores(
        model, dataset, tokenizer, image_transform, k_test=k_test, max_length=max_length, max_words=max_words,
        image_column=image_column, captions_column=captions_column, batch_size=batch_size,
        max_pairs_per_forward=max_pairs_per_forward,
    )  # fmt: skip
    return retrieval_recall(scores.score_i2t, scores.score_t2i, torch.tensor(scores.text_to_image), ks)


__all__ = [
    "UNRANKED_SCORE",
    "SplitRetrievalScores",
    "evaluate_retrieval",
    "retrieval_scores",
    "retrieval_texts",
    "split_retrieval_scores",
]
