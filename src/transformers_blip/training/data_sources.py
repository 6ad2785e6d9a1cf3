"""The image-text pairs a training run reads: the synthetic benchmark or one of the real formats, by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset, concatenate_datasets

from ..benchmark import build_synthetic_benchmark
from ..data import (
    flatten_captions,
    load_caption_json,
    load_coco_karpathy,
    load_image_folder,
    load_parquet,
    load_webdataset,
)

PAIR_COLUMNS = ["image", "caption", "image_id"]


def load_pretraining_pairs(
    source: str,
    files: Sequence[str] = (),
    image_root: str | None = None,
    synthetic_kwargs: dict[str, Any] | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Image-text pairs to pretrain on and, for the synthetic benchmark, held-out images with their captions.

    Args:
        source: `"synthetic"` (the "human" split, one row per caption, followed by the noisy "web" split; held out:
            the "test" split), `"coco_karpathy"` (training annotation files), `"caption_json"` (BLIP's pretraining
            lists), `"image_folder"` (a folder with `metadata.jsonl`), `"parquet"`, or `"webdataset"` (tar shards,
            streamed: give `max_steps`).
        files: the annotation files, folder, parquet files or shards of a real source.
        image_root: where the relative image paths of the JSON formats start.
        synthetic_kwargs: arguments of `build_synthetic_benchmark` (its VQA, NLVR2 and validation splits are kept
            minimal unless given).

    Returns:
        `(train, held_out)`. `train` has `image`, `caption` and, where the source has them, `image_id`.
    """
    if source == "synthetic":
        benchmark = build_synthetic_benchmark(
            **{"num_val": 1, "num_vqa": 3, "num_nlvr": 1, **(synthetic_kwargs or {})}
        )
        human = flatten_captions(benchmark["human"]).select_columns(PAIR_COLUMNS)
        web = benchmark["web"].select_columns(PAIR_COLUMNS)
        return concatenate_datasets([human, web]), benchmark["test"]
    if not files:
        raise ValueError(f"the {source!r} source needs files (annotation files, a folder, parquet files or shards)")
    if source == "coco_karpathy":
        return concatenate_datasets([load_coco_karpathy(file, image_root) for file in files]), None
    loaders = {
        "caption_json": lambda: load_caption_json(files, image_root),
        "image_folder": lambda: load_image_folder(files[0]),
        "parquet": lambda: load_parquet(files),
        "webdataset": lambda: load_webdataset(files),
    }
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; choose synthetic, coco_karpathy or one of {sorted(loaders)}")
    return loaders[source](), None


def with_caption_lengths(dataset: Dataset, text_column: str = "caption") -> Dataset:
    """Adds a `length` column (words per caption), which `group_by_length` batching sorts by."""

    def count_words(batch: dict[str, list]) -> dict[str, list[int]]:
        return {"length": [len(text.split()) for text in batch[text_column]]}

    # Schema out: the input columns plus `length` (int).
    return dataset.map(count_words, batched=True, desc="Counting caption words")


__all__ = ["PAIR_COLUMNS", "load_pretraining_pairs", "with_caption_lengths"]
