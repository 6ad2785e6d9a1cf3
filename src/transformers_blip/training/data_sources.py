"""The image-text pairs a training run reads: the synthetic benchmark or one of the real formats, by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, IterableDataset, concatenate_datasets

from ..benchmark import build_synthetic_benchmark
from ..data import (
    SkipReport,
    flatten_captions,
    load_caption_json,
    load_coco_karpathy,
    load_image_folder,
    load_parquet,
    load_webdataset,
)
from ..data.hub_datasets import HubDatasetArguments, load_hub_splits

PAIR_COLUMNS = ["image", "caption", "image_id"]


def _one_folder(files: Sequence[str], report: SkipReport) -> Dataset:
    if len(files) != 1:
        raise ValueError(f"the 'image_folder' source reads one folder; got {len(files)}: {list(files)}")
    return load_image_folder(files[0], report=report)


# The formats read whole when the run starts, by every process: (files, image root, report) -> pairs.
_FILE_LOADERS: dict[str, Callable[[Sequence[str], str | None, SkipReport], Dataset]] = {
    "coco_karpathy": lambda files, root, report: concatenate_datasets(
        [load_coco_karpathy(file, root, report=report) for file in files]
    ),
    "caption_json": lambda files, root, report: load_caption_json(files, root, report=report),
    "image_folder": lambda files, root, report: _one_folder(files, report),
    "parquet": lambda files, root, report: load_parquet(files, report=report),
}


def load_pretraining_pairs(
    source: str,
    files: Sequence[str] = (),
    image_root: str | None = None,
    synthetic_kwargs: dict[str, Any] | None = None,
    report: SkipReport | None = None,
    count_load_skips: bool = True,
    hub_arguments: HubDatasetArguments | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Image-text pairs to pretrain on and, for the synthetic benchmark, held-out images with their captions.

    Args:
        source: `"synthetic"` (the "human" split, one row per caption, followed by the noisy "web" split; held out:
            the "test" split), `"coco_karpathy"` (training annotation files), `"caption_json"` (BLIP's pretraining
            lists), `"image_folder"` (a folder with `metadata.jsonl`), `"parquet"`, `"webdataset"` (tar shards,
            streamed: give `max_steps`), or `"hub"` (the `datasets` dataset of `hub_arguments`, its training split,
            streamed with `hub_arguments.streaming`).
        files: the annotation files, folder, parquet files or shards of a real source.
        image_root: where the relative image paths of the JSON formats start.
        synthetic_kwargs: arguments of `build_synthetic_benchmark` (its VQA, NLVR2 and validation splits are kept
            minimal unless given).
        report: the run's `SkipReport`. What the files lose when they are read goes to its `"loading"` part, which
            is emptied first, since a resumed run reads the same files again; a webdataset stream records in the
            report itself as it is read. A strict report stops at the first bad record.
        count_load_skips: `False` on every process but the main one: each process reads the same files and would
            count their losses once more (strict mode still raises everywhere).
        hub_arguments: `--dataset_name` and its columns, for `source="hub"`.

    Returns:
        `(train, held_out)`. `train` has `image`, `caption` and, where the source has them, `image_id`. A source
        that yields no pair at all, or no `caption` column, is an error naming the files.
    """
    if source == "synthetic":
        benchmark = build_synthetic_benchmark(
            **{"num_val": 1, "num_vqa": 3, "num_nlvr": 1, **(synthetic_kwargs or {})}
        )
        human = flatten_captions(benchmark["human"]).select_columns(PAIR_COLUMNS)
        web = benchmark["web"].select_columns(PAIR_COLUMNS)
        return concatenate_datasets([human, web]), benchmark["test"]
    report = report if report is not None else SkipReport()
    if source == "hub" and hub_arguments.streaming:  # cleaned as it streams: each process counts what it reads
        return load_hub_splits(hub_arguments, "pretrain", report=report)["train"], None
    if source == "hub":

        def read(load_report: SkipReport) -> Dataset:
            return load_hub_splits(hub_arguments, "pretrain", report=load_report)["train"]

    else:
        if source != "webdataset" and source not in _FILE_LOADERS:
            raise ValueError(
                f"unknown source {source!r}; choose synthetic, webdataset, hub or one of {sorted(_FILE_LOADERS)}"
            )
        if not files:
            raise ValueError(
                f"the {source!r} source needs files (annotation files, a folder, parquet files or shards)"
            )
        if source == "webdataset":  # read as it streams, each shard by one process: every process counts its own
            return load_webdataset(files, report=report), None

        def read(load_report: SkipReport) -> Dataset:
            return _read_files(source, files, image_root, load_report)

    load_report = report.part("loading")
    if not count_load_skips:
        with load_report.not_counting():
            return read(load_report), None
    load_report.clear()
    return read(load_report), None


def _read_files(source: str, files: Sequence[str], image_root: str | None, report: SkipReport) -> Dataset:
    """The pairs of a format read whole, unless they cannot train anything: then an error naming the inputs."""
    pairs = _FILE_LOADERS[source](files, image_root, report)
    inputs = f"the {source!r} source ({', '.join(map(str, files))})"
    if len(pairs) == 0:
        raise ValueError(f"{inputs} gave no usable image-text pair. {report.summary()}")
    if "caption" not in pairs.column_names:
        raise ValueError(f"{inputs} has no 'caption' column, only {pairs.column_names}")
    return pairs


def with_caption_lengths(dataset: Dataset, text_column: str = "caption") -> Dataset:
    """Adds a `length` column (words per caption), which `group_by_length` batching sorts by."""

    def count_words(batch: dict[str, list]) -> dict[str, list[int]]:
        return {"length": [len(text.split()) for text in batch[text_column]]}

    # Schema out: the input columns plus `length` (int).
    return dataset.map(count_words, batched=True, desc="Counting caption words")


__all__ = ["PAIR_COLUMNS", "load_pretraining_pairs", "with_caption_lengths"]
