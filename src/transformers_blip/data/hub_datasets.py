"""`datasets` datasets by name or path, as transformers' examples take them, in the columns each task's collators read.

A training script given `--dataset_name` reads its splits from a dataset on the hub (`--dataset_name
nlphuji/flickr30k`), a local directory of data files in the hub's layout (what `datasets.load_dataset(path)`
reads: `data/train-00000-of-00001.parquet`, ...) or a directory written by `save_to_disk`, instead of its `--source`.
`--image_column`, `--caption_column` and the task's other column flags name the dataset's columns; `load_hub_splits`
renames them to the project's (`image`, `caption`/`captions`, `image_id`, `question`, `answers`, `image0`,
`image1`, `sentence`, `label`) and cleans the text as the loaders of real formats do.

Images stay undecoded (`datasets.Image(decode=False)`: the path or the bytes, whether the column held an `Image`
feature, paths or bytes) until `DecodeImages` decodes them in the DataLoader workers with the project's one decoder,
skipping and counting a broken one (`blip caption --dataset-name` reads the `"images"` task the same way). Text that
cannot be used (an empty caption, a question without words, a label that is not true or false) skips its row,
recorded in the run's `SkipReport`. A column the dataset lacks is an error that names it and lists the columns
there are.

`--streaming` reads the training split as an `IterableDataset`, cleaned as it streams, for datasets too large to
download first; evaluation splits are read whole, as evaluation needs their length. Scripts that cannot train on a
stream refuse it (`reads_hub_dataset`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from datasets import Image as ImageFeature

from .annotations import clean_caption, clean_caption_list, stable_id
from .loaders import _nlvr_label, vqa_answer_weights
from .pairs import flatten_captions
from .skips import BadSampleError, SkipReport
from .text import MAX_WORDS, pre_question

logger = logging.getLogger(__name__)

HUB_TASKS = ("caption", "pretrain", "vqa", "nlvr", "images")
# The splits each task reads: pretraining (and captioning a dataset's images) reads one; captioning and retrieval
# need a validation split to pick the best checkpoint, while VQA and NLVR2 hold theirs out of train without one.
_TASK_SPLITS = {
    "caption": ("train", "validation", "test"),
    "pretrain": ("train",),
    "vqa": ("train", "validation", "test"),
    "nlvr": ("train", "validation", "test"),
    "images": ("train",),
}
_VALIDATION_HELD_OUT_OF_TRAIN = ("vqa", "nlvr")


@dataclass
class HubDatasetArguments:
    """Where a script reads a `datasets` dataset and which of its columns hold what (transformers' examples' flags)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A datasets dataset in place of --source: a hub id, a local folder of data files in the "
                  "hub's layout, or a save_to_disk folder."},
    )  # fmt: skip
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration."})
    dataset_cache_dir: str | None = field(default=None, metadata={"help": "Where datasets caches what it reads."})
    train_split: str = field(default="train", metadata={"help": "The dataset's training split."})
    eval_split: str = field(
        default="validation", metadata={"help": "The split validated on (VQA, NLVR2: held out of train if absent)."}
    )
    test_split: str = field(default="test", metadata={"help": "The split evaluated at the end."})
    streaming: bool = field(default=False, metadata={"help": "Stream the training split instead of downloading it."})
    image_column: str = field(default="image", metadata={"help": "Images: datasets.Image, paths or bytes."})
    caption_column: str = field(default="caption", metadata={"help": "A caption, or a list of them, per image."})
    image_id_column: str = field(
        default="image_id", metadata={"help": "Image ids, used where present (default: the row's number)."}
    )
    question_column: str = field(default="question", metadata={"help": "VQA: the question."})
    answers_column: str = field(
        default="answers", metadata={"help": "VQA: the answers (texts, or VQA v2's dicts with an 'answer')."}
    )
    question_id_column: str = field(
        default="question_id", metadata={"help": "VQA: question ids, used where present (default: the row's number)."}
    )
    left_image_column: str = field(default="left_image", metadata={"help": "NLVR2: the left image of a pair."})
    right_image_column: str = field(default="right_image", metadata={"help": "NLVR2: the right image of a pair."})
    statement_column: str = field(default="sentence", metadata={"help": "NLVR2: the statement about the pair."})
    label_column: str = field(default="label", metadata={"help": "NLVR2: whether it is true (bool, 0/1, 'True')."})


# --------------------------------------------------------------------------------------------------------- reading
def _is_saved_to_disk(path: str) -> bool:
    """A directory `save_to_disk` wrote (a `DatasetDict`'s or a `Dataset`'s), which `load_dataset` does not read."""
    markers = ("dataset_dict.json", "state.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, marker)) for marker in markers)


class _DatasetSplits:
    """The splits of a dataset by name, each read (whole or streamed) only when asked for."""

    def __init__(self, arguments: HubDatasetArguments):
        self.arguments = arguments
        self.name = arguments.dataset_name
        self.saved: DatasetDict | None = None
        if _is_saved_to_disk(self.name):
            saved = load_from_disk(self.name)
            # One dataset without splits is the training split.
            self.saved = saved if isinstance(saved, DatasetDict) else DatasetDict({arguments.train_split: saved})
            self.names = list(self.saved)
        else:  # a streaming read resolves the data files of every split and reads none of them
            self.names = list(self._load(split=None, streaming=True))

    def _load(self, split: str | None, streaming: bool):
        arguments = self.arguments
        return load_dataset(
            self.name, arguments.dataset_config_name, split=split, streaming=streaming,
            cache_dir=arguments.dataset_cache_dir,
        )  # fmt: skip

    def __contains__(self, split: str) -> bool:
        return split in self.names

    def read(self, split: str, flag: str, streaming: bool) -> Dataset | IterableDataset:
        if split not in self.names:
            raise ValueError(f"{self.name} has no split {split!r} ({flag}); its splits: {', '.join(self.names)}")
        if self.saved is None:
            return self._load(split, streaming)
        return self.saved[split].to_iterable_dataset() if streaming else self.saved[split]


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)))  # a stream whose features are unknown until its first row is read


def check_columns(dataset: Dataset | IterableDataset, columns: dict[str, str], where: str) -> None:
    """Raise a `ValueError` naming the first of `columns` ({flag: column}) that `dataset` lacks, with those it has."""
    present = _column_names(dataset)
    for flag, column in columns.items():
        if column not in present:
            raise ValueError(f"{where} has no column {column!r} ({flag}); its columns: {', '.join(present)}")


# ------------------------------------------------------------------------------------------------------ the tasks
@dataclass(frozen=True)
class _TaskColumns:
    """What a task reads of a dataset and what it writes.

    images: {project column: (flag, dataset column)}; texts: {flag: dataset column}, required; optional: dataset
    columns used where present; made: the columns `make_row` writes.
    """

    images: dict[str, tuple[str, str]]
    texts: dict[str, str]
    optional: tuple[str, ...]
    made: tuple[str, ...]


def _task_columns(task: str, arguments: HubDatasetArguments, present: list[str]) -> _TaskColumns:
    if task == "nlvr":
        images = {
            "image0": ("--left_image_column", arguments.left_image_column),
            "image1": ("--right_image_column", arguments.right_image_column),
        }
        texts = {"--statement_column": arguments.statement_column, "--label_column": arguments.label_column}
        return _TaskColumns(images, texts, (), ("sentence", "label"))
    images = {"image": ("--image_column", arguments.image_column)}
    if task == "images":  # images alone, to caption or index
        return _TaskColumns(images, {}, (), ())
    if task == "vqa":
        optional = (arguments.answers_column, arguments.question_id_column, arguments.image_id_column)
        made = ("question_id", "question", "answers", "unique_answers", "answer_weights")
        if arguments.image_id_column in present:  # held-out validation keeps an image's questions together
            made += ("image_id",)
        return _TaskColumns(images, {"--question_column": arguments.question_column}, optional, made)
    texts = {"--caption_column": arguments.caption_column}
    return _TaskColumns(images, texts, (arguments.image_id_column,), ("image_id", "captions"))


# A row of the dataset (its text columns), its name in skip reports and its number -> the task's text columns,
# or `BadSampleError`.
RowMaker = Callable[[dict[str, Any], str, int], dict[str, Any]]


def _given_id(row: dict[str, Any], column: str, index: int) -> int:
    value = row.get(column)
    return stable_id(value if value is not None else index)


def _caption_row(arguments: HubDatasetArguments, max_words: int, report: SkipReport) -> RowMaker:
    def make_row(row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        captions = clean_caption_list(row[arguments.caption_column], source, max_words, report)
        return {"captions": captions, "image_id": _given_id(row, arguments.image_id_column, index)}

    return make_row


def _vqa_answers(value: Any, source: str) -> list[str]:
    """The answers of a question as texts: a list of texts, VQA v2's `[{"answer": ...}, ...]`, one text, or none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and isinstance(value.get("answer"), list):  # a list of structs, as Arrow stores it
        value = value["answer"]
    if not isinstance(value, list):
        raise BadSampleError(source, "missing_field", f"answers are a {type(value).__name__}, not a list")
    return [str(answer["answer"]) if isinstance(answer, dict) else str(answer) for answer in value]


def _vqa_row(arguments: HubDatasetArguments, max_words: int, report: SkipReport) -> RowMaker:
    def make_row(row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        question = row[arguments.question_column]
        question = pre_question(question, max_words) if isinstance(question, str) else ""
        if not question:
            raise BadSampleError(source, "empty_caption", "no question")
        answers = _vqa_answers(row.get(arguments.answers_column), source)
        unique, weights = vqa_answer_weights(answers) if answers else ([], [])
        made = {
            "question_id": _given_id(row, arguments.question_id_column, index),
            "question": question,
            "answers": answers,
            "unique_answers": unique,
            "answer_weights": weights,
        }
        if arguments.image_id_column in row:
            made["image_id"] = _given_id(row, arguments.image_id_column, index)
        return made

    return make_row


def _nlvr_row(arguments: HubDatasetArguments, max_words: int, report: SkipReport) -> RowMaker:
    def make_row(row: dict[str, Any], source: str, index: int) -> dict[str, Any]:
        return {
            "sentence": clean_caption(row[arguments.statement_column], source, max_words),
            "label": _nlvr_label(row[arguments.label_column], source),
        }

    return make_row


def _row_maker(task: str, arguments: HubDatasetArguments, max_words: int | None, report: SkipReport) -> RowMaker:
    if task == "vqa":
        return _vqa_row(arguments, max_words or MAX_WORDS["vqa"], report)
    if task == "nlvr":
        return _nlvr_row(arguments, max_words or MAX_WORDS["nlvr"], report)
    default = MAX_WORDS["pretrain"] if task == "pretrain" else MAX_WORDS["caption"]
    return _caption_row(arguments, max_words or default, report)


# -------------------------------------------------------------------------------------------------------- cleaning
def _made_columns(
    rows: dict[str, list], first_index: int, make_row: RowMaker, made: tuple[str, ...], where: str, report: SkipReport
) -> tuple[dict[str, list], list[int]]:
    """(`make_row`'s columns for the rows it kept, the offsets of those rows) of a batch given as columns."""
    names = list(rows)
    made_rows, kept = [], []
    for offset, values in enumerate(zip(*rows.values())):
        index = first_index + offset
        try:
            made_rows.append(make_row(dict(zip(names, values)), f"{where}:{index}", index))
            kept.append(offset)
        except BadSampleError as error:
            report.record(error)  # raises in strict mode
    return {name: [row[name] for row in made_rows] for name in made}, kept


def _clean_dataset(
    dataset: Dataset, columns: _TaskColumns, read: list[str], make_row: RowMaker, where: str, report: SkipReport
) -> Dataset:
    """`dataset` with `make_row`'s columns in place of the text columns it reads, less the rows it refused.

    Only the text columns are read here (never the images), and the new columns are swapped in on the memory-mapped
    table before the refused rows are left out by an index mapping, so a large dataset is not copied.
    """
    made, kept = _made_columns(dataset.select_columns(read).to_dict(), 0, make_row, columns.made, where, report)
    if not kept:
        raise ValueError(f"{where} gave no usable row. {report.summary()}")
    dataset = dataset.remove_columns([name for name in {*read, *columns.made} if name in dataset.column_names])
    for name, values in made.items():
        full = [None] * len(dataset)  # the refused rows, left out below
        for offset, value in zip(kept, values):
            full[offset] = value
        dataset = dataset.add_column(name, full)
    return dataset.select(kept) if len(kept) < len(dataset) else dataset


def _clean_stream(
    stream: IterableDataset, columns: _TaskColumns, make_row: RowMaker, where: str, report: SkipReport
) -> IterableDataset:
    """A stream whose rows carry `make_row`'s columns besides their own; refused rows are left out as it streams."""

    def clean(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        first = indices[0] if indices else 0
        made, kept = _made_columns(batch, first, make_row, columns.made, where, report)
        return {**{name: [values[offset] for offset in kept] for name, values in batch.items()}, **made}

    return stream.map(clean, batched=True, with_indices=True)


def _task_split(
    data: Dataset | IterableDataset,
    task: str,
    role: str,
    arguments: HubDatasetArguments,
    where: str,
    max_words: int | None,
    report: SkipReport,
) -> Dataset | IterableDataset:
    """One split in the task's columns: its images undecoded under the project's names, its text cleaned, the rows
    refused by the cleaning left out (and counted); caption training rows one caption each, caption evaluation rows
    one image each."""
    present = _column_names(data)
    columns = _task_columns(task, arguments, present)
    check_columns(data, dict(columns.images.values()), where)
    check_columns(data, columns.texts, where)
    for _, column in columns.images.values():  # before any map, while a stream's features are known
        if data.features is not None:
            data = data.cast_column(column, ImageFeature(decode=False))
    read = [*columns.texts.values(), *(name for name in columns.optional if name in present)]
    if columns.texts:  # images alone have no text to clean
        make_row = _row_maker(task, arguments, max_words, report)
        if isinstance(data, IterableDataset):
            data = _clean_stream(data, columns, make_row, where, report)
        else:
            data = _clean_dataset(data, columns, read, make_row, where, report)
    # Schema out: the task's image columns (datasets.Image(decode=False)) under its names, then `columns.made`.
    renames = {column: project for project, (_, column) in columns.images.items() if column != project}
    data = data.select_columns([column for _, column in columns.images.values()] + list(columns.made))
    if renames:
        data = data.rename_columns(renames)
    if task in ("caption", "pretrain"):
        data = _one_caption_per_row(data) if role == "train" else _one_row_per_image(data)
    return data


def _one_caption_per_row(data: Dataset | IterableDataset) -> Dataset | IterableDataset:
    """Training pairs `{image, image_id, caption}` from images with their captions."""
    if isinstance(data, Dataset):
        return flatten_captions(data)

    def explode(batch: dict[str, list]) -> dict[str, list]:
        counts = [len(captions) for captions in batch["captions"]]
        rows = {
            name: [value for value, count in zip(values, counts) for _ in range(count)]
            for name, values in batch.items()
            if name != "captions"
        }
        rows["caption"] = [caption for captions in batch["captions"] for caption in captions]
        return rows

    return data.map(explode, batched=True, remove_columns=["captions"])


def _one_row_per_image(data: Dataset) -> Dataset:
    """Evaluation images `{image, captions, image_id}`, each once with all its references: a dataset of one caption
    per row (COCO's annotations as rows) names an image several times under one `image_id`."""
    ids = data["image_id"]
    if len(set(ids)) == len(ids):
        return data
    first: dict[int, int] = {}
    references: dict[int, list[str]] = {}
    for index, (image_id, captions) in enumerate(zip(ids, data["captions"])):
        first.setdefault(image_id, index)
        references.setdefault(image_id, []).extend(captions)
    images = data.select(list(first.values())).remove_columns("captions")
    return images.add_column("captions", [references[image_id] for image_id in first])


def load_hub_splits(
    arguments: HubDatasetArguments,
    task: str,
    max_words: int | None = None,
    report: SkipReport | None = None,
    with_train: bool = True,
) -> dict[str, Dataset | IterableDataset | None]:
    """`{"train", "validation", "test"}` of a `datasets` dataset, in the columns the task's collators read.

    Args:
        arguments: the dataset and its columns (`arguments.dataset_name` must be set).
        task: `"caption"` (captioning and retrieval: train `{image, image_id, caption}`, one row per caption;
            validation and test `{image, image_id, captions}`, one row per image), `"pretrain"` (train only,
            `{image, image_id, caption}`), `"vqa"` (`{image, question_id, question, answers, unique_answers,
            answer_weights}`, and `image_id` where the dataset has it; test questions may lack answers) or `"nlvr"`
            (`{image0, image1, sentence, label}`) or `"images"` (train only, `{image}`: images to caption).
        max_words: words kept per text; the task's BLIP limit by default (`MAX_WORDS`).
        report: where rows skipped for their text are recorded (a strict report raises instead).
        with_train: read the training split; `False` for a run that only evaluates (train is then `None`).

    Returns:
        The splits. Pretraining reads train alone (the others are `None`); VQA and NLVR2 get `None` for validation
        when the dataset has no `--eval_split`, and the scripts hold a share of train out instead. With
        `arguments.streaming` the training split is an `IterableDataset`.

    Raises:
        ValueError: an unknown task, a split or column the dataset lacks (named, with those it has), or a split left
            without a usable row.
    """
    if task not in HUB_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(HUB_TASKS)}")
    if not arguments.dataset_name:
        raise ValueError("load_hub_splits needs a dataset: --dataset_name")
    report = report if report is not None else SkipReport()
    dataset = _DatasetSplits(arguments)
    split_flags = {
        "train": (arguments.train_split, "--train_split"),
        "validation": (arguments.eval_split, "--eval_split"),
        "test": (arguments.test_split, "--test_split"),
    }
    result: dict[str, Dataset | IterableDataset | None] = {"train": None, "validation": None, "test": None}
    for role in _TASK_SPLITS[task]:
        split, flag = split_flags[role]
        if role == "train" and not with_train:
            continue
        if role == "validation" and task in _VALIDATION_HELD_OUT_OF_TRAIN and split not in dataset:
            logger.warning(f"{dataset.name} has no split {split!r} ({flag}): validation is held out of train")
            continue
        data = dataset.read(split, flag, streaming=arguments.streaming and role == "train")
        result[role] = _task_split(data, task, role, arguments, f"{dataset.name}[{split}]", max_words, report)
    return result


def reads_hub_dataset(arguments: HubDatasetArguments, source: str, can_stream: bool = False) -> bool:
    """Whether a run reads `--dataset_name` rather than its `--source`.

    Raises a `ValueError` for flags that contradict each other: `--dataset_name` beside a `--source` other than the
    default `synthetic`, `--streaming` without `--dataset_name`, or `--streaming` in a script that reads its training
    split whole (`can_stream=False`: it counts epochs or builds a vocabulary from every caption first).
    """
    if not arguments.dataset_name:
        if arguments.streaming:
            raise ValueError("--streaming streams a --dataset_name; none was given")
        return False
    if source != "synthetic":
        raise ValueError(f"--dataset_name replaces --source; give one of them, not both (--source {source})")
    if arguments.streaming and not can_stream:
        raise ValueError(
            "this script reads its training split whole (epochs, a vocabulary from its text): drop --streaming"
        )
    return True


__all__ = ["HUB_TASKS", "HubDatasetArguments", "check_columns", "load_hub_splits", "reads_hub_dataset"]
