"""Write the synthetic benchmark in the formats real data comes in, so the same loaders serve both.

Layout under the output directory:

    images/{image_id}.png                      the images the JSON formats point at
    annotations/coco_karpathy_{train,val,test}.json    from human (train) and val/test
    annotations/pretrain_{human,web}.json      BLIP's pretraining lists
    annotations/vqa_{train,test}.json, answer_list.json
    annotations/nlvr_{train,test}.json
    imagefolder/{human,web,val,test}/          images + metadata.jsonl
    parquet/{split}.parquet                    every split, image bytes inside
    webdataset/{human,web}-{00000..}.tar       image-text pairs, streamed

Images are written as stored (the benchmark's PNG bytes), never re-encoded, so a loader gives back the very same
pixels.

`export_benchmark` writes the whole tree into a hidden temporary directory beside the output directory and renames
it into place when every format is written: a reader never sees one run's captions beside another's images, nor
the shards of an older, larger export. A non-empty output directory is refused unless `overwrite`, which replaces
it whole.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict
from datasets import Image as ImageFeature

from ..atomic_writes import atomic_directory, atomic_file
from ..data.loaders import vqa_answer_list
from ..data.pairs import flatten_captions

EXPORT_FORMATS = ("coco_karpathy", "pretrain_json", "imagefolder", "parquet", "webdataset", "vqa", "nlvr")
_CAPTION_SPLITS = ("human", "web", "val", "test")


def _encoded(dataset: Dataset) -> Dataset:
    """The dataset with every image column left as stored bytes (no decoding)."""
    for name, feature in dataset.features.items():
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
    return dataset


def _image_columns(dataset: Dataset) -> list[tuple[str, str]]:
    """(image column, its id column) pairs: ("image", "image_id") or ("image0", "image0_id"), ..."""
    return [(name, f"{name}_id") for name, f in dataset.features.items() if isinstance(f, ImageFeature)]


def image_file_name(image_id: int) -> str:
    return f"{image_id}.png"


def _write_images(dataset: Dataset, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for row in _encoded(dataset):
        for image_column, id_column in _image_columns(dataset):
            path = directory / image_file_name(row[id_column])
            if not path.exists():  # VQA images repeat across questions
                path.write_bytes(row[image_column]["bytes"])


def _write_json(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _text_rows(dataset: Dataset) -> Iterator[dict]:
    """Rows without the image columns (cheap: no image is read)."""
    text_only = dataset.remove_columns([name for name, _ in _image_columns(dataset)])
    yield from text_only


def _relative_image(image_id: int) -> str:
    return f"images/{image_file_name(image_id)}"


def export_coco_karpathy(benchmark: DatasetDict, output_dir: Path) -> list[Path]:
    """Karpathy-style annotation files for the human (train), val and test splits.

    Train lists one caption per record with an `image_id` like BLIP's ("synthetic_12"); val and test list each
    image once with its captions and no id (the loader reads it from the file name, as the original does).
    """
    train = [
        {"image": _relative_image(row["image_id"]), "caption": caption, "image_id": f"synthetic_{row['image_id']}"}
        for row in _text_rows(benchmark["human"])
        for caption in row["captions"]
    ]
    paths = [_write_json(train, output_dir / "annotations" / "coco_karpathy_train.json")]
    for split in ("val", "test"):
        records = [
            {"image": _relative_image(row["image_id"]), "caption": row["captions"]}
            for row in _text_rows(benchmark[split])
        ]
        paths.append(_write_json(records, output_dir / "annotations" / f"coco_karpathy_{split}.json"))
    return paths


def export_pretrain_json(benchmark: DatasetDict, output_dir: Path) -> list[Path]:
    """BLIP's pretraining lists: human pairs and web pairs, each record keeping its image id (and noise flags)."""
    human = [
        {"image": _relative_image(row["image_id"]), "caption": caption, "image_id": row["image_id"]}
        for row in _text_rows(benchmark["human"])
        for caption in row["captions"]
    ]
    web = [{"image": _relative_image(row["image_id"]), **row} for row in _text_rows(benchmark["web"])]
    return [
        _write_json(human, output_dir / "annotations" / "pretrain_human.json"),
        _write_json(web, output_dir / "annotations" / "pretrain_web.json"),
    ]


def export_imagefolder(
    benchmark: DatasetDict, output_dir: Path, splits: Sequence[str] = _CAPTION_SPLITS
) -> list[Path]:
    """One image folder per split, with `metadata.jsonl` holding every other column."""
    paths = []
    for split in splits:
        folder = output_dir / "imagefolder" / split
        _write_images(benchmark[split], folder)
        lines = [
            json.dumps({"file_name": image_file_name(row["image_id"]), **row}) for row in _text_rows(benchmark[split])
        ]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(folder)
    return paths


def export_parquet(benchmark: DatasetDict, output_dir: Path) -> list[Path]:
    """Every split as one parquet file, image bytes embedded."""
    paths = []
    for split, dataset in benchmark.items():
        path = output_dir / "parquet" / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(path))
        paths.append(path)
    return paths


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # identical benchmarks give identical shards
    tar.addfile(info, io.BytesIO(data))


def _shards(samples: Iterator[tuple[str, bytes, str, dict]], shard_size: int) -> Iterator[list[tuple]]:
    """`samples` in lists of `shard_size` (the last one shorter)."""
    shard = []
    for sample in samples:
        shard.append(sample)
        if len(shard) == shard_size:
            yield shard
            shard = []
    if shard:
        yield shard


def write_webdataset_shards(
    samples: Iterator[tuple[str, bytes, str, dict]], directory: Path, prefix: str, shard_size: int
) -> list[Path]:
    """Write (key, png bytes, caption, metadata) samples into tar shards of `shard_size` samples.

    Each shard is written under a temporary name and renamed when complete, so a `*.tar` glob never reads half of
    one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for shard in _shards(samples, shard_size):
        paths.append(directory / f"{prefix}-{len(paths):05d}.tar")
        with atomic_file(paths[-1]) as handle, tarfile.open(fileobj=handle, mode="w") as tar:
            for key, image_bytes, caption, metadata in shard:
                _add_member(tar, f"{key}.png", image_bytes)
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
                _add_member(tar, f"{key}.json", json.dumps(metadata).encode("utf-8"))
    return paths


def _pair_samples(dataset: Dataset, metadata_columns: Sequence[str]) -> Iterator[tuple[str, bytes, str, dict]]:
    for index, row in enumerate(_encoded(dataset)):
        metadata = {name: row[name] for name in metadata_columns}
        yield f"{row['image_id']:08d}_{index:08d}", row["image"]["bytes"], row["caption"], metadata


def export_webdataset(benchmark: DatasetDict, output_dir: Path, shard_size: int = 1000) -> list[Path]:
    """Human pairs (one caption per sample) and web pairs as tar shards: `.png`, `.txt` caption, `.json` ids."""
    directory = output_dir / "webdataset"
    human = _pair_samples(flatten_captions(benchmark["human"]), ("image_id",))
    web = _pair_samples(benchmark["web"], ("image_id", "is_noisy", "noise_kind"))
    return write_webdataset_shards(human, directory, "human", shard_size) + write_webdataset_shards(
        web, directory, "web", shard_size
    )


def export_vqa(benchmark: DatasetDict, output_dir: Path) -> list[Path]:
    """BLIP's VQA files; the test file keeps its answers, for scoring. Plus the candidate `answer_list.json`."""
    paths = []
    for split in ("vqa_train", "vqa_test"):
        _write_images(benchmark[split], output_dir / "images")
        records = [
            {
                "question_id": row["question_id"],
                "question": row["question"],
                "answer": row["answers"],
                "image": _relative_image(row["image_id"]),
                "dataset": "vqa",
                "image_id": row["image_id"],
                "question_type": row["question_type"],
                "multiple_choice_answer": row["multiple_choice_answer"],
            }
            for row in _text_rows(benchmark[split])
        ]
        paths.append(_write_json(records, output_dir / "annotations" / f"{split}.json"))
    answers = vqa_answer_list(benchmark["vqa_train"])
    paths.append(_write_json(answers, output_dir / "annotations" / "answer_list.json"))
    return paths


def export_nlvr(benchmark: DatasetDict, output_dir: Path) -> list[Path]:
    """BLIP's NLVR2 files: two image paths, the sentence, and the label as the strings "True"/"False"."""
    paths = []
    for split in ("nlvr_train", "nlvr_test"):
        _write_images(benchmark[split], output_dir / "images")
        records = [
            {
                "images": [_relative_image(row["image0_id"]), _relative_image(row["image1_id"])],
                "sentence": row["sentence"],
                "label": "True" if row["label"] else "False",
                "image0_id": row["image0_id"],
                "image1_id": row["image1_id"],
            }
            for row in _text_rows(benchmark[split])
        ]
        paths.append(_write_json(records, output_dir / "annotations" / f"{split}.json"))
    return paths


def _write_formats(benchmark: DatasetDict, output_dir: Path, formats: Sequence[str], shard_size: int):
    """Write each of `formats` under `output_dir`; returns the files written per format."""
    if {"coco_karpathy", "pretrain_json"} & set(formats):
        for split in _CAPTION_SPLITS:
            _write_images(benchmark[split], output_dir / "images")
    writers = {
        "coco_karpathy": lambda: export_coco_karpathy(benchmark, output_dir),
        "pretrain_json": lambda: export_pretrain_json(benchmark, output_dir),
        "imagefolder": lambda: export_imagefolder(benchmark, output_dir),
        "parquet": lambda: export_parquet(benchmark, output_dir),
        "webdataset": lambda: export_webdataset(benchmark, output_dir, shard_size),
        "vqa": lambda: export_vqa(benchmark, output_dir),
        "nlvr": lambda: export_nlvr(benchmark, output_dir),
    }
    return {name: writers[name]() for name in formats}


def export_benchmark(
    benchmark: DatasetDict,
    output_dir: str | os.PathLike,
    formats: Sequence[str] = EXPORT_FORMATS,
    shard_size: int = 1000,
    overwrite: bool = False,
) -> dict[str, list[Path]]:
    """Write the benchmark in each of `formats` (see the module docstring); returns the files written per format.

    The output appears whole when the export is done (see the module docstring). Raises `FileExistsError` when
    `output_dir` is not empty, before any work or, if another export finished first, at the end; `overwrite`
    replaces it.
    """
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}; choose from {EXPORT_FORMATS}")
    output_dir = Path(output_dir)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        written = _write_formats(benchmark, staging, formats, shard_size)
    return {name: [output_dir / path.relative_to(staging) for path in paths] for name, paths in written.items()}
