"""Decoding inside a run: images are decoded where they are used, and a bad one drops its sample, counted.

`DecodeImages` runs in DataLoader workers (as a `set_transform` of a map-style dataset, or a batched `map` of a
streaming one). A sample whose image cannot be decoded is recorded in the `SkipReport` (shared with the workers
through its log directory) and comes out with `None` in its image columns; `SkippingCollator` leaves such rows out
of the batch. In strict mode the report raises instead, and the DataLoader re-raises the error in the main process
with the file and the reason in its message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .decoding import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, load_image
from .skips import BadSampleError, SkipReport


def _flatten_texts(values: list[Any]) -> tuple[list[str], list[int | None]]:
    """Texts of several columns (each a string or a list of strings) as one list, plus how to split it back."""
    flat, lengths = [], []
    for value in values:
        if isinstance(value, str):
            flat.append(value)
            lengths.append(None)
        else:
            flat.extend(value)
            lengths.append(len(value))
    return flat, lengths


def _unflatten_texts(flat: list[str], lengths: list[int | None]) -> list[Any]:
    values, position = [], 0
    for length in lengths:
        if length is None:
            values.append(flat[position])
            position += 1
        else:
            values.append(list(flat[position : position + length]))
            position += length
    return values


class DecodeImages:
    """Decode the image columns of a batch robustly and apply an image transform; bad rows are marked, not raised.

    Use as `dataset.set_transform(DecodeImages(...))`, or `iterable_dataset.map(DecodeImages(...), batched=True)`,
    and collate with `SkippingCollator`.

    Args:
        image_transform: applied to each decoded RGB PIL image (e.g. `BlipTrainTransform`); None keeps PIL images.
        image_columns: columns holding images (paths, bytes, `datasets.Image` values or PIL images).
        text_columns: columns whose text must stay true under the transform's horizontal flip (`("caption",)`, or
            `("question", "answers", "unique_answers")`); passed with the image to `image_transform.with_text`.
            One image column only.
        report: where skipped samples are counted; a fresh one when not given (see `self.report`).
        max_pixels, min_side: `load_image` limits.
    """

    def __init__(
        self,
        image_transform: Callable | None = None,
        image_columns: Sequence[str] = ("image",),
        text_columns: Sequence[str] = (),
        report: SkipReport | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ):
        if text_columns and not hasattr(image_transform, "with_text"):
            raise ValueError("text_columns needs an image_transform with a `with_text(image, text)` method")
        if text_columns and len(image_columns) != 1:
            raise ValueError("text_columns can follow the flip of one image column only; see `mirror_pair` for pairs")
        self.image_transform = image_transform
        self.image_columns = tuple(image_columns)
        self.text_columns = tuple(text_columns)
        self.report = report if report is not None else SkipReport()
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        batch = {name: list(values) for name, values in batch.items()}
        for row in range(len(batch[self.image_columns[0]])):
            images = self._decode_row(batch, row)
            if images is None:
                for name in self.image_columns:
                    batch[name][row] = None
                continue
            if self.text_columns:
                self._transform_with_text(batch, row, images[0])
            else:
                for name, image in zip(self.image_columns, images):
                    batch[name][row] = self.image_transform(image) if self.image_transform else image
        return batch

    def _decode_row(self, batch: dict[str, list], row: int) -> list | None:
        try:
            return [load_image(batch[name][row], self.max_pixels, self.min_side) for name in self.image_columns]
        except BadSampleError as error:
            self.report.record(error)  # raises in strict mode
            return None

    def _transform_with_text(self, batch: dict[str, list], row: int, image: Any) -> None:
        texts, lengths = _flatten_texts([batch[name][row] for name in self.text_columns])
        image, texts = self.image_transform.with_text(image, texts)
        batch[self.image_columns[0]][row] = image
        for name, value in zip(self.text_columns, _unflatten_texts(list(texts), lengths)):
            batch[name][row] = value


def drop_skipped(rows: list[dict], image_columns: Sequence[str] = ("image",)) -> list[dict]:
    """The rows whose images decoded (`DecodeImages` sets a failed row's image columns to None)."""
    return [row for row in rows if all(row.get(name) is not None for name in image_columns)]


def collate_rows(rows: list[dict]) -> dict[str, Any]:
    """A plain collate for dict rows: tensors are stacked, everything else becomes a list."""
    batch = {}
    for name in rows[0]:
        values = [row[name] for row in rows]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


class SkippingCollator:
    """Wrap a collate function so that samples `DecodeImages` marked as bad are left out of the batch.

    Returns None for a batch in which every sample was bad (a training loop should skip it); the samples are
    already counted in the `SkipReport`.

    Args:
        collate_fn: collates the remaining rows; `collate_rows` by default.
        image_columns: the columns `DecodeImages` decodes.
    """

    def __init__(
        self, collate_fn: Callable[[list[dict]], Any] | None = None, image_columns: Sequence[str] = ("image",)
    ):
        self.collate_fn = collate_fn if collate_fn is not None else collate_rows
        self.image_columns = tuple(image_columns)

    def __call__(self, rows: list[dict]) -> Any:
        kept = drop_skipped(rows, self.image_columns)
        return self.collate_fn(kept) if kept else None
