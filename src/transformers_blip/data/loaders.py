"""Loaders for the annotation formats people have: BLIP's JSON files, image folders, parquet.

Each returns a `datasets.Dataset` whose image columns hold `datasets.Image(decode=False)` values (a path or the
bytes), so nothing is decoded until a sample is used, in a DataLoader worker, by `DecodeImages`, which skips and
counts what cannot be decoded. Text is cleaned here, as BLIP cleans it (`pre_caption`, `pre_question`), and
records that cannot be used (malformed JSON, non-UTF-8 text, empty captions, missing fields) are skipped and
recorded in the `SkipReport` (or raise, in strict mode). Web-scale formats stream: see `streaming.py`.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets import Image as ImageFeature

from .annotations import clean_caption, clean_caption_list, read_annotations, required_field, stable_id
from .decoding import IMAGE_EXTENSIONS
from .skips import BadFileError, BadSampleError, SkipReport
from .text import MAX_WORDS, pre_question

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------


def _report_or_default(report: SkipReport | None) -> SkipReport:
    return report if report is not None else SkipReport()


def _warn_if_skipped(report: SkipReport, before: int, what: str) -> None:
    skipped = len(report) - before
    if skipped:
        logger.warning(f"{what}: skipped {skipped} records. {report.summary()}")


def _image_value(path: str, image_root: PathLike | None) -> dict:
    """A `datasets.Image(decode=False)` value pointing at the file."""
    full_path = os.path.join(image_root, path) if image_root is not None else path
    return {"bytes": None, "path": os.fspath(full_path)}


def _extras(record: dict, extra_fields: Sequence[str]) -> dict:
    return {name: record.get(name) for name in extra_fields}


def _as_files(files: PathLike | Sequence[PathLike]) -> list[PathLike]:
    return [files] if isinstance(files, (str, os.PathLike)) else list(files)


def _applied(
    items: Iterable[tuple[str, Any]], function: Callable[[Any, str], Any], report: SkipReport
) -> list[tuple[str, Any]]:
    """(source, function(item, source)) for every (source, item); a `BadSampleError` is recorded in its place."""
    results = []
    for source, item in items:
        try:
            results.append((source, function(item, source)))
        except BadSampleError as error:
            report.record(error)
    return results


RowMaker = Callable[[dict, str], dict]  # a record (always a JSON object) and its source -> a row
# Given the rows of one file, the check each of them must pass: a rule that holds across a file.
FileRule = Callable[[list[dict]], Callable[[dict, str], dict]]


def _read_rows(
    files: Sequence[PathLike], make_row: RowMaker, report: SkipReport, file_rule: FileRule | None = None
) -> list[dict]:
    """The rows `make_row(record, source)` builds from the records of every file, in order.

    The loop every annotation loader shares: a record that `make_row` refuses with a `BadSampleError` (or that
    breaks `file_rule`, or that cannot be read) is recorded in `report` and left out; one warning sums them up.
    """
    before = len(report)
    rows = []
    for annotation_file in files:
        built = _applied(read_annotations(annotation_file, report), make_row, report)
        if file_rule is not None:
            built = _applied(built, file_rule([row for _, row in built]), report)
        rows += [row for _, row in built]
    _warn_if_skipped(report, before, ", ".join(map(str, files)))
    return rows


def _inferred_feature(name: str, values: list, files: Sequence[PathLike]) -> dict:
    """The type `datasets` infers for a column, or an error naming the files when the values cannot share one."""
    try:
        return dict(Dataset.from_dict({name: values}).features)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        types = sorted({type(value).__name__ for value in values if value is not None})
        raise ValueError(
            f"{', '.join(map(str, files))}: the field {name!r} holds values of types {types}, which cannot form one"
            f" column ({error})"
        ) from error


def _as_dataset(
    rows: list[dict], features: Features, extra_fields: Sequence[str], files: Sequence[PathLike]
) -> Dataset:
    """A Dataset with `features` for the standard columns; extra fields keep the types inferred from the data."""
    columns = {name: [row.get(name) for row in rows] for name in [*features, *extra_fields]}
    inferred = {}
    for name in extra_fields:
        inferred.update(_inferred_feature(name, columns[name], files))
    return Dataset.from_dict(columns, features=Features({**features, **inferred}))


_PAIR_FEATURES = Features({"image": ImageFeature(decode=False), "caption": Value("string")})


# ---------------------------------------------------------------------------------------------------------------
# COCO / Flickr30K Karpathy splits, BLIP's pretraining lists
# ---------------------------------------------------------------------------------------------------------------


def _one_caption_layout(rows: list[dict]) -> Callable[[dict, str], dict]:
    """Training files give each record one caption, evaluation files a list of them: a file keeps the layout most
    of its records have, and a record of the other layout is skipped rather than left without its text column."""
    lists = 2 * sum("captions" in row for row in rows) > len(rows)

    def check(row: dict, source: str) -> dict:
        if ("captions" in row) != lists:
            found, usual = ("a list", "one caption each") if not lists else ("one caption", "lists")
            raise BadSampleError(source, "missing_field", f"'caption' is {found}, but most records have {usual}")
        return row

    return check


def load_coco_karpathy(
    annotation_file: PathLike,
    image_root: PathLike,
    max_words: int = MAX_WORDS["caption"],
    report: SkipReport | None = None,
) -> Dataset:
    """A COCO- or Flickr30K-Karpathy annotation file as BLIP releases it (`coco_karpathy_train.json`, ...).

    Training files list `{"image", "caption", "image_id"}`, one caption per record: the dataset has columns
    image, caption, image_id. Evaluation files list `{"image", "caption": [...]}`, one image per record: the
    dataset has image, captions, image_id. A record of the other layout than most of the file's is skipped. Ids are
    `stable_id` of `image_id` or, when absent, of the image path: equal for the same image, distinct across files
    and datasets ("coco_391895" and "flickr_391895" differ).
    """
    report = _report_or_default(report)

    def make_row(record: dict, source: str) -> dict:
        image = _image_value(required_field(record, "image", source, str), image_root)
        captions = required_field(record, "caption", source)
        if isinstance(captions, list):
            row = {"image": image, "captions": clean_caption_list(captions, source, max_words, report)}
        else:
            row = {"image": image, "caption": clean_caption(captions, source, max_words)}
        image_id = record.get("image_id")
        row["image_id"] = stable_id(image_id if image_id is not None else record["image"])
        return row

    rows = _read_rows([annotation_file], make_row, report, _one_caption_layout)
    is_eval = bool(rows) and "captions" in rows[0]
    text_feature = {"captions": List(Value("string"))} if is_eval else {"caption": Value("string")}
    features = Features({"image": ImageFeature(decode=False), **text_feature, "image_id": Value("int64")})
    return _as_dataset(rows, features, (), [annotation_file])


def load_nocaps(annotation_file: PathLike, image_root: PathLike, report: SkipReport | None = None) -> Dataset:
    """A NoCaps annotation file as BLIP releases it (`nocaps_val.json`, `nocaps_test.json`): a list of
    `{"image": path, "img_id": int}`, images only, as NoCaps' references stay on its evaluation server.

    Columns: image, image_id (the record's `img_id`, the id NoCaps' results name). A record without an integer
    `img_id` is skipped and recorded.
    """

    def make_row(record: dict, source: str) -> dict:
        image = _image_value(required_field(record, "image", source, str), image_root)
        image_id = required_field(record, "img_id", source, (int, str))
        if isinstance(image_id, bool) or not str(image_id).isdigit():
            raise BadSampleError(source, "missing_field", f"'img_id' {image_id!r} is not a whole number")
        return {"image": image, "image_id": int(image_id)}

    rows = _read_rows([annotation_file], make_row, _report_or_default(report))
    features = Features({"image": ImageFeature(decode=False), "image_id": Value("int64")})
    return _as_dataset(rows, features, (), [annotation_file])


def load_caption_json(
    annotation_files: PathLike | Sequence[PathLike],
    image_root: PathLike | None = None,
    max_words: int = MAX_WORDS["pretrain"],
    extra_fields: Sequence[str] = (),
    report: SkipReport | None = None,
) -> Dataset:
    """BLIP's pretraining lists, `[{"image": path, "caption": text}, ...]`, several files mixed into one dataset.

    Columns: image, caption, plus `extra_fields` copied from the records (None where missing). Files may be JSON
    lists or JSON lines. Paths are taken as written, or under `image_root` when given.
    """

    def make_row(record: dict, source: str) -> dict:
        image = _image_value(required_field(record, "image", source, str), image_root)
        caption = clean_caption(required_field(record, "caption", source), source, max_words)
        return {"image": image, "caption": caption, **_extras(record, extra_fields)}

    files = _as_files(annotation_files)
    rows = _read_rows(files, make_row, _report_or_default(report))
    return _as_dataset(rows, _PAIR_FEATURES, extra_fields, files)


# ---------------------------------------------------------------------------------------------------------------
# Image folder with metadata.jsonl
# ---------------------------------------------------------------------------------------------------------------

_TEXT_FIELDS = ("caption", "text")


def _clean_metadata_text(record: dict, source: str, max_words: int, report: SkipReport) -> dict:
    row = dict(record)
    for name in _TEXT_FIELDS:
        if name in row:
            row[name] = clean_caption(row[name], source, max_words)
    if "captions" in row:
        row["captions"] = clean_caption_list(row["captions"], source, max_words, report)
    return row


def _same_text_fields(rows: list[dict]) -> Callable[[dict, str], dict]:
    """A text field that some lines of the metadata have, every line must have: a line without its caption would
    otherwise become a row whose caption is None."""
    fields = [name for name in (*_TEXT_FIELDS, "captions") if any(name in row for row in rows)]

    def check(row: dict, source: str) -> dict:
        missing = [name for name in fields if name not in row]
        if missing:
            raise BadSampleError(source, "missing_field", f"no {missing[0]!r}, which other lines have")
        return row

    return check


def _path_in_folder(folder: Path, file_name: str, source: str) -> str:
    """`folder / file_name`, refusing a name that leaves the folder (absolute, or climbing out through "..")."""
    relative = os.path.normpath(file_name)
    if os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep):
        raise BadSampleError(source, "unsafe_path", f"file_name {file_name!r} is outside {folder}")
    if relative == os.curdir:
        raise BadSampleError(source, "missing_field", f"file_name {file_name!r} names no file")
    return str(folder / file_name)


def load_image_folder(
    folder: PathLike, max_words: int = MAX_WORDS["pretrain"], report: SkipReport | None = None
) -> Dataset:
    """A folder of images with a `metadata.jsonl`, as datasets' imagefolder convention has it.

    Every metadata line is `{"file_name": ..., ...}`; its other fields become columns, with `caption`/`text`
    (strings) and `captions` (lists) cleaned by `pre_caption`. Without a metadata file the dataset lists the
    images alone. Unlike `load_dataset("imagefolder")`, a malformed or non-UTF-8 line skips that record, not the
    whole folder; so does a line without a text field that other lines have, and a `file_name` outside the folder
    (absolute, or through "..": `unsafe_path`).
    """
    folder = Path(folder)
    report = _report_or_default(report)
    metadata_file = folder / "metadata.jsonl"
    if not metadata_file.exists():
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS)
        return Dataset.from_dict(
            {"image": [{"bytes": None, "path": str(p)} for p in files]},
            features=Features({"image": ImageFeature(decode=False)}),
        )

    def make_row(record: dict, source: str) -> dict:
        path = _path_in_folder(folder, required_field(record, "file_name", source, str), source)
        row = _clean_metadata_text(record, source, max_words, report)
        del row["file_name"]
        return {"image": {"bytes": None, "path": path}, **row}

    rows = _read_rows([metadata_file], make_row, report, _same_text_fields)
    metadata_fields = [name for name in dict.fromkeys(name for row in rows for name in row) if name != "image"]
    return _as_dataset(rows, Features({"image": ImageFeature(decode=False)}), metadata_fields, [metadata_file])


# ---------------------------------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------------------------------


def _readable_parquet_files(files: Sequence[PathLike], report: SkipReport) -> list[tuple[str, int]]:
    """(path, number of rows) of every file whose footer reads; the others are reported."""
    import pyarrow.parquet as pq

    readable = []
    for path in map(os.fspath, files):
        try:
            with pq.ParquetFile(path) as parquet_file:  # the footer alone: enough to catch a truncated file
                readable.append((path, parquet_file.metadata.num_rows))
        except Exception as error:
            reason = "missing_file" if not os.path.exists(path) else "broken_shard"
            report.record(BadFileError(path, reason, str(error)))
    return readable


class _RowSources:
    """Names row `index` of files read one after the other as `file:row`, without listing every row."""

    def __init__(self, files: list[tuple[str, int]]):
        self.paths = [path for path, _ in files]
        self.starts = list(itertools.accumulate((num_rows for _, num_rows in files), initial=0))

    def __getitem__(self, index: int) -> str:
        file_index = bisect.bisect_right(self.starts, index) - 1
        return f"{self.paths[file_index]}:{index - self.starts[file_index]}"


def load_parquet(
    files: PathLike | Sequence[PathLike],
    image_columns: Sequence[str] = ("image",),
    caption_column: str | None = "caption",
    max_words: int = MAX_WORDS["pretrain"],
    cache_dir: PathLike | None = None,
    report: SkipReport | None = None,
    streaming: bool = False,
) -> Dataset:
    """Parquet files whose image columns hold image bytes (as `Dataset.to_parquet` writes an `Image` column, or a
    plain binary column).

    Unreadable files are skipped and reported; the caption column, if any, is cleaned with `pre_caption` and
    rows whose caption is empty are skipped. Always a `Dataset`: to read files lazily, split across ranks and
    workers like webdataset shards, call `stream_parquet` (`streaming=True` is refused with that advice).
    """
    files = _as_files(files)
    report = _report_or_default(report)
    if streaming:
        raise ValueError("load_parquet returns a Dataset; for a stream split across ranks call stream_parquet(files)")
    before = len(report)
    readable = _readable_parquet_files(files, report)
    if not readable:
        raise FileNotFoundError(f"none of the parquet files could be read: {files}. {report.summary()}")
    # A file without rows (a CapFilt shard that kept nothing) adds nothing, and `from_parquet` cannot read one.
    readable = [(path, num_rows) for path, num_rows in readable if num_rows > 0] or readable[:1]
    paths = [path for path, _ in readable]
    if readable[0][1] > 0:
        dataset = Dataset.from_parquet(paths, cache_dir=os.fspath(cache_dir) if cache_dir else None)
    else:  # every file is empty: an empty dataset with their columns
        import pyarrow.parquet as pq

        dataset = Dataset(pq.read_table(paths[0]))
    for name in image_columns:
        if name in dataset.column_names:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
    if caption_column is not None and caption_column in dataset.column_names:
        dataset = _clean_caption_column(dataset, caption_column, max_words, _RowSources(readable), report)
    _warn_if_skipped(report, before, ", ".join(paths))
    return dataset


def _clean_caption_column(
    dataset: Dataset, caption_column: str, max_words: int, sources: _RowSources, report: SkipReport
) -> Dataset:
    """Replace the caption column by its cleaned text and drop the rows left without words."""
    cleaned, keep = [], []
    for index, text in enumerate(dataset[caption_column]):  # the column alone: no image is read
        try:
            cleaned.append(clean_caption(text, sources[index], max_words))
            keep.append(index)
        except BadSampleError as error:
            report.record(error)
            cleaned.append("")
    # Swapping a column in is a metadata operation on the memory-mapped table; `select` adds an index mapping.
    dataset = dataset.remove_columns(caption_column).add_column(caption_column, cleaned)
    return dataset.select(keep) if len(keep) < len(cleaned) else dataset


# ---------------------------------------------------------------------------------------------------------------
# VQA and NLVR2, as BLIP releases their annotations
# ---------------------------------------------------------------------------------------------------------------

VG_ANSWER_WEIGHT = 0.2  # the weight BLIP gives Visual Genome's single answer

_VQA_FEATURES = Features(
    {
        "image": ImageFeature(decode=False),
        "question_id": Value("int64"),
        "question": Value("string"),
        "answers": List(Value("string")),
        "unique_answers": List(Value("string")),
        "answer_weights": List(Value("float64")),
    }
)


def vqa_answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """The distinct answers (first-seen order) and their weights, count / number of answers, as BLIP trains."""
    unique = list(dict.fromkeys(answers))
    return unique, [answers.count(answer) / len(answers) for answer in unique]


def _vqa_row(record: dict, source: str, image_roots: dict[str, PathLike | None], max_words: int) -> dict:
    dataset_name = record.get("dataset", "vqa")
    image = _image_value(
        required_field(record, "image", source, str), image_roots.get(dataset_name, image_roots["vqa"])
    )
    question = pre_question(str(required_field(record, "question", source)), max_words)
    if not question:
        raise BadSampleError(source, "empty_caption", "empty question")
    answer = record.get("answer")
    if answer is None:  # a test question
        answer = []
    if isinstance(answer, str):  # Visual Genome: one answer, a fixed weight
        answers, unique, weights = [answer], [answer], [VG_ANSWER_WEIGHT]
    elif not isinstance(answer, list):
        raise BadSampleError(source, "missing_field", f"'answer' is a {type(answer).__name__}, not a text or a list")
    else:
        answers = [str(a) for a in answer]
        unique, weights = vqa_answer_weights(answers) if answers else ([], [])
    return {
        "image": image,
        "question_id": stable_id(record["question_id"] if record.get("question_id") is not None else source),
        "question": question,
        "answers": answers,
        "unique_answers": unique,
        "answer_weights": weights,
    }


def load_vqa(
    annotation_files: PathLike | Sequence[PathLike],
    image_root: PathLike,
    vg_image_root: PathLike | None = None,
    max_words: int = MAX_WORDS["vqa"],
    extra_fields: Sequence[str] = (),
    report: SkipReport | None = None,
) -> Dataset:
    """VQA annotations as BLIP releases them (`vqa_train.json`, `vqa_val.json`, `vg_qa.json`, `vqa_test.json`).

    Records are `{"question_id", "question", "answer", "image", "dataset"}`; `answer` is the list of ten
    answers for VQA v2, a single string for Visual Genome (weight 0.2), absent for test questions. Columns:
    image, question_id, question (`pre_question`), answers, unique_answers, answer_weights (count / len, BLIP's
    training targets), plus `extra_fields`.
    """
    image_roots = {"vqa": image_root, "vg": vg_image_root if vg_image_root is not None else image_root}

    def make_row(record: dict, source: str) -> dict:
        return {**_vqa_row(record, source, image_roots, max_words), **_extras(record, extra_fields)}

    files = _as_files(annotation_files)
    rows = _read_rows(files, make_row, _report_or_default(report))
    return _as_dataset(rows, _VQA_FEATURES, extra_fields, files)


def vqa_answer_list(dataset: Dataset, column: str = "answers", min_count: int = 1) -> list[str]:
    """The candidate answers for rank inference, like BLIP's `answer_list.json`.

    Every answer seen at least `min_count` times, most frequent first.
    """
    counts: dict[str, int] = {}
    for answers in dataset[column]:
        for answer in answers:
            counts[answer] = counts.get(answer, 0) + 1
    return [answer for answer, count in sorted(counts.items(), key=lambda item: -item[1]) if count >= min_count]


_NLVR_FEATURES = Features(
    {
        "image0": ImageFeature(decode=False),
        "image1": ImageFeature(decode=False),
        "sentence": Value("string"),
        "label": Value("int64"),
    }
)


def _nlvr_label(value: Any, source: str) -> int:
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    raise BadSampleError(source, "missing_field", f"label {value!r} is not True/False")


def load_nlvr(
    annotation_files: PathLike | Sequence[PathLike],
    image_root: PathLike,
    max_words: int = MAX_WORDS["nlvr"],
    extra_fields: Sequence[str] = (),
    report: SkipReport | None = None,
) -> Dataset:
    """NLVR2 annotations as BLIP releases them: `{"images": [left, right], "sentence", "label": "True"|"False"}`.

    Columns: image0, image1, sentence (`pre_caption`, 40 words), label (1 for true), plus `extra_fields`.
    """

    def make_row(record: dict, source: str) -> dict:
        images = required_field(record, "images", source, list)
        if len(images) != 2 or not all(isinstance(image, str) for image in images):
            raise BadSampleError(source, "missing_field", "'images' is not a pair of paths")
        return {
            "image0": _image_value(images[0], image_root),
            "image1": _image_value(images[1], image_root),
            "sentence": clean_caption(required_field(record, "sentence", source), source, max_words),
            "label": _nlvr_label(required_field(record, "label", source), source),
            **_extras(record, extra_fields),
        }

    files = _as_files(annotation_files)
    rows = _read_rows(files, make_row, _report_or_default(report))
    return _as_dataset(rows, _NLVR_FEATURES, extra_fields, files)
