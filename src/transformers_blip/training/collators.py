"""Collators that turn image-text rows into model batches: tokenised, transformed, and decoded in the workers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..data import DecodeImages, SkippingCollator, pre_caption, stable_id


class ImageTextCollator:
    """Batches image-text rows for [`BlipForPreTraining`] (and the retrieval recipe, with image ids).

    Args:
        tokenizer: a BERT-style tokenizer (`[CLS] ... [SEP]`); the model puts `[ENC]` / `[DEC]` in place of `[CLS]`.
        image_transform: PIL image -> (3, H, W) tensor. A transform with a `with_text(image, text)` method (such as
            `BlipTrainTransform`) is given the caption too, so that a horizontal flip can keep "left"/"right" true.
            `None` when the rows already hold tensors (a dataset transformed by `DecodeImages`).
        max_length: texts are truncated to this many tokens (30 in BLIP's pretraining).
        padding: `"max_length"` pads every text to `max_length`; `"longest"` pads to the longest text of the batch,
            which saves much of the text encoders' work when batches group texts of similar length
            (`TrainingArguments(group_by_length=True)` with a `length` column).
        max_words: captions are cleaned with `pre_caption(text, max_words)` first (`None`: used as they are).
        image_column, text_column: column names of the rows.
        image_id_column: if set, the rows' image ids are passed as `image_ids` (all captions of an image become
            positives of each other).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Any], torch.Tensor] | None,
        max_length: int = 30,
        max_words: int | None = 30,
        image_column: str = "image",
        text_column: str = "caption",
        image_id_column: str | None = None,
        padding: str = "max_length",
    ):
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.max_length = max_length
        self.padding = padding
        self.max_words = max_words
        self.image_column = image_column
        self.text_column = text_column
        self.image_id_column = image_id_column

    def _transform(self, image: Any, text: str) -> tuple[torch.Tensor, str]:
        if isinstance(image, torch.Tensor):
            return image, text
        if hasattr(self.image_transform, "with_text"):
            return self.image_transform.with_text(image, text)
        return self.image_transform(image), text

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values, texts = [], []
        for row in rows:
            text = row[self.text_column]
            if self.max_words is not None:
                text = pre_caption(text, self.max_words)
            pixels, text = self._transform(row[self.image_column], text)
            pixel_values.append(pixels)
            texts.append(text)
        encoded = self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {
            "pixel_values": torch.stack(pixel_values),  # (B, 3, H, W)
            "input_ids": encoded["input_ids"],  # (B, L), L = max_length or the longest text
            "attention_mask": encoded["attention_mask"],
        }
        if self.image_id_column is not None:
            # `stable_id` keeps integer ids and maps any other id (a string such as "coco_391895") to a fixed int64.
            ids = [stable_id(row[self.image_id_column]) for row in rows]
            batch["image_ids"] = torch.tensor(ids, dtype=torch.long)
        return batch


class DecodingCollator:
    """Decodes and transforms the images of a list of rows, drops the rows whose image is broken, batches the rest.

    As the DataLoader's `collate_fn` it runs in the worker processes. Decoding here rather than in a dataset
    transform keeps the dataset's columns plain, so that Trainer can read a `length` column to group texts of
    similar length (`train_sampling_strategy="group_by_length"`).

    Args:
        decode: a `DecodeImages`; it counts broken images in its `SkipReport` and keeps captions true under flips.
        collate: batches the decoded rows, e.g. an `ImageTextCollator` without an image transform.
    """

    def __init__(self, decode: DecodeImages, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.decode = decode
        self.skipping_collate = SkippingCollator(collate, image_columns=decode.image_columns)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        columns = self.decode({name: [row[name] for row in rows] for name in rows[0]})
        decoded_rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return self.skipping_collate(decoded_rows)


__all__ = ["DecodingCollator", "ImageTextCollator"]
