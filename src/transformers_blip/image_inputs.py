"""Many images from the places people keep them, decoded in DataLoader workers: the input side of `blip caption`
and of the retrieval index.

An input is an image file, a folder of them (subfolders too when `recursive`), a text file listing image paths,
a parquet file (one image a row), a webdataset tar shard (one image per key) or a split of a `datasets` dataset
(`DatasetImages`). Every image has a name that is stable from run to run, so that a restarted job can tell what it
already did: a file's path, `file.parquet:ROW` for a parquet row, `shard.tar/KEY` for a webdataset sample,
`NAME[SPLIT]:ROW` for a dataset's row.

Bad inputs (a path that does not exist, a folder without images, an image that cannot be decoded, a damaged
shard) are reported one name and reason each, never raised: a job over many images carries on without them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data.decoding import IMAGE_EXTENSIONS
from .data.streaming import tar_samples
from .image_processing_blip import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

LIST_FILE_SUFFIXES = (".txt", ".lst")
PARQUET_SUFFIXES = (".parquet",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class ImageFailures:
    """The inputs that failed, each `(name, reason)`, in the order they were met."""

    failed: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.failed.append((name, reason))


@dataclass(eq=False)
class DatasetImages:
    """The images of one split of a `datasets` dataset, as `load_hub_splits(..., "images")` gives it (an undecoded
    `image` column), named `NAME[SPLIT]:ROW`. Like a parquet file, it is a container that one worker reads whole."""

    name: str
    dataset: Any

    def __str__(self) -> str:
        return self.name

    def images(self) -> Iterator[tuple[str, Any]]:
        """(name, undecoded image) of every row, in order."""
        for row, example in enumerate(self.dataset):
            yield f"{self.name}:{row}", example["image"]


def is_container(path: str | DatasetImages) -> bool:
    """Whether `path` is a parquet file, a tar shard or a dataset's split: a source of many images rather than one."""
    return isinstance(path, DatasetImages) or path.lower().endswith(PARQUET_SUFFIXES + TAR_SUFFIXES)


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.is_file() and (_is_image_file(path) or is_container(str(path))))


def _listed_paths(list_file: Path) -> list[Path]:
    """The paths in a text file, one a line; relative ones start at the file's folder."""
    lines = list_file.read_text(encoding="utf-8").splitlines()
    return [list_file.parent / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def collect_images(inputs: Sequence[str | os.PathLike], recursive: bool, failures: ImageFailures) -> list[str]:
    """The image files and containers (parquet files, tar shards) that `inputs` name: files, folders (and their
    subfolders with `recursive`), and text files listing paths. An input that does not exist, or a folder without
    images, is recorded in `failures`. Each path comes once, in the order given."""
    images: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = _folder_images(path, recursive)
            if not found:
                hint = "" if recursive else " (add --recursive for its subfolders)"
                failures.add(str(path), f"no image files in this folder{hint}")
            images += [str(image) for image in found]
        elif path.is_file() and path.suffix.lower() in LIST_FILE_SUFFIXES:
            try:
                images += [str(listed) for listed in _listed_paths(path)]
            except (OSError, UnicodeDecodeError) as error:
                failures.add(str(path), f"cannot read this list of paths ({error})")
        elif path.is_file():
            images.append(str(path))
        else:
            failures.add(str(path), "no such file or folder")
    return list(dict.fromkeys(images))


@dataclass
class DecodedRow:
    """One image after a worker read it: its name, and pixels for each image processor, or why it failed."""

    name: str
    pixels: tuple[torch.Tensor, ...] | None = None
    error: str | None = None


def _parquet_images(path: str, image_column: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    parquet_file = pq.ParquetFile(path)
    if image_column not in parquet_file.schema_arrow.names:
        raise ValueError(f"no column {image_column!r}; its columns: {parquet_file.schema_arrow.names}")
    row = 0
    for batch in parquet_file.iter_batches(batch_size=64, columns=[image_column]):
        for value in batch.column(0).to_pylist():
            yield f"{path}:{row}", value
            row += 1


def _tar_images(path: str) -> Iterator[tuple[str, Any]]:
    for key, files in tar_samples(path):
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
        yield f"{path}/{key}", (files[extension] if extension else None)


class DecodedImages(IterableDataset):
    """Decodes images in DataLoader workers and turns each into pixels with every one of `image_processors`.

    Each worker takes a share of the inputs (a container goes whole to one worker), skips the names in `skip`,
    and yields a [`DecodedRow`] per image; a bad image or a damaged container becomes a row with its error.
    """

    def __init__(
        self,
        inputs: Sequence[str],
        image_processors: Sequence[Any],
        skip: set[str] | frozenset[str] = frozenset(),
        image_column: str = "image",
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.inputs = list(inputs)
        self.image_processors = list(image_processors)
        self.skip = skip
        self.image_column = image_column
        self.max_pixels = max_pixels

    def __iter__(self) -> Iterator[DecodedRow]:
        worker = get_worker_info()
        share = self.inputs if worker is None else self.inputs[worker.id :: worker.num_workers]
        for path in share:
            yield from self._rows(path)

    def _rows(self, path: str) -> Iterator[DecodedRow]:
        if not is_container(path):
            if path not in self.skip:
                yield self._decoded(path, path)
            return
        if isinstance(path, DatasetImages):
            images = path.images()
        elif path.lower().endswith(PARQUET_SUFFIXES):
            images = _parquet_images(path, self.image_column)
        else:
            images = _tar_images(path)
        try:
            for name, source in images:
                if name in self.skip:
                    continue
                if source is None:
                    yield DecodedRow(name, error="no image in this sample")
                else:
                    yield self._decoded(name, source)
        except Exception as error:  # tarfile, zlib and pyarrow each raise their own errors for a damaged file
            yield DecodedRow(str(path), error=f"cannot read this file ({type(error).__name__}: {error})")

    def _decoded(self, name: str, source: Any) -> DecodedRow:
        try:
            image = decode_image(source, max_pixels=self.max_pixels, name=name)
        except (ImageDecodeError, OSError) as error:
            return DecodedRow(name, error=str(error))
        pixels = tuple(
            processor(images=image, return_tensors="pt")["pixel_values"][0] for processor in self.image_processors
        )
        return DecodedRow(name, pixels=pixels)


def _keep_rows(rows: list[DecodedRow]) -> list[DecodedRow]:
    return rows  # batches stay lists: the main process splits decoded images from failures


def decoded_batches(
    dataset: DecodedImages, batch_size: int, num_workers: int, failures: ImageFailures
) -> Iterator[tuple[list[str], tuple[torch.Tensor, ...]]]:
    """`(names, pixel batches)` of the images that decoded, one stacked batch per image processor; the others go
    to `failures`. With several workers, batches come in the order the workers finish them."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_keep_rows)
    for rows in loader:
        for row in rows:
            if row.error is not None:
                failures.add(row.name, row.error)
        good = [row for row in rows if row.error is None]
        if good:
            stacked = tuple(torch.stack(column) for column in zip(*(row.pixels for row in good)))
            yield [row.name for row in good], stacked


def count_images(inputs: Sequence[str | DatasetImages]) -> int | None:
    """How many images `inputs` hold, for a progress bar: files count one, parquet files their rows (read from the
    footer), a dataset's split its length; None when a tar shard or a stream is among them (counting would read it
    all)."""
    import pyarrow.parquet as pq

    total = 0
    for path in inputs:
        if isinstance(path, DatasetImages):
            if not hasattr(path.dataset, "__len__"):  # a stream
                return None
            total += len(path.dataset)
        elif path.lower().endswith(TAR_SUFFIXES):
            return None
        elif path.lower().endswith(PARQUET_SUFFIXES):
            try:
                total += pq.ParquetFile(path).metadata.num_rows
            except Exception:  # a damaged file: the workers report it
                continue
        else:
            total += 1
    return total


__all__ = [
    "DatasetImages",
    "DecodedImages",
    "DecodedRow",
    "ImageFailures",
    "collect_images",
    "count_images",
    "decoded_batches",
    "is_container",
]
