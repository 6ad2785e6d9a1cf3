"""Image-text retrieval by ITC similarity alone, and recall@K from a similarity matrix: the held-out check of
pretraining."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import pre_caption
from ..training.callbacks import unwrap_model
from .retrieval_metrics import retrieval_recall


@torch.no_grad()
def itc_features(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ITC features of images (I, E) and texts (T, E) from the online encoders, in batches (any model with
    `get_image_features` / `get_text_features`: the feature, retrieval and pretraining heads)."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    image_feats = [
        model.get_image_features(pixel_values[start : start + batch_size].to(device))
        for start in range(0, pixel_values.shape[0], batch_size)
    ]
    text_feats = [
        model.get_text_features(
            input_ids[start : start + batch_size].to(device), attention_mask[start : start + batch_size].to(device)
        )
        for start in range(0, input_ids.shape[0], batch_size)
    ]
    return torch.cat(image_feats), torch.cat(text_feats)


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall@K in percent from one image-text similarity (I, T) and each text's image index (T,):
    `retrieval_recall` with the same scores both ways, as ITC alone gives them."""
    return retrieval_recall(similarity, similarity.t(), text_to_image, ks)


def itc_retrieval_recall(
    model: nn.Module,
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    image_transform: Callable[[Any], torch.Tensor],
    max_length: int = 30,
    max_words: int = 30,
    ks: Sequence[int] = (1, 5, 10),
    image_column: str = "image",
    captions_column: str = "captions",
) -> dict[str, float]:
    """Recall@K (percent) of ITC retrieval on rows `{image, captions: list[str]}`, plus the recall@1 of chance.

    Keys: `txt_r{k}` (image-to-text), `img_r{k}` (text-to-image) and `chance_r1`.
    """
    was_training = unwrap_model(model).training
    unwrap_model(model).eval()
    pixel_values, texts, text_to_image = [], [], []
    for image_index, row in enumerate(dataset):
        pixel_values.append(image_transform(row[image_column]))
        for caption in row[captions_column]:
            texts.append(pre_caption(caption, max_words))
            text_to_image.append(image_index)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    image_feat, text_feat = itc_features(
        model, torch.stack(pixel_values), encoded["input_ids"], encoded["attention_mask"]
    )
    unwrap_model(model).train(was_training)
    metrics = recall_at_k((image_feat @ text_feat.t()).cpu(), torch.tensor(text_to_image), ks)
    # A random ranking puts one of an image's n texts first with probability n / T, its image first with 1 / I:
    # both are 1 / I when every image has the same number of texts.
    metrics["chance_r1"] = 100.0 / len(pixel_values)
    return metrics


__all__ = ["itc_features", "itc_retrieval_recall", "recall_at_k"]
