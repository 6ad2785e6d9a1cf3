"""Streaming loaders for web-scale data: webdataset tar shards and parquet files, split by node and by worker.

Each shard (a tar or parquet file) is one unit of work: `datasets` hands shards to DataLoader workers, and
`split_dataset_by_node` hands them to ranks, so every sample is read exactly once per epoch. A shard that breaks
part-way (truncated download, bad gzip, foreign file) is reported as `broken_shard`, an unreadable file rather than
a count of samples, and the stream continues with the next; the samples read before the break are kept. Images stay
encoded bytes until `DecodeImages` decodes them.

Under `Trainer`/accelerate leave `rank` and `world_size` unset: accelerate shards a `datasets.IterableDataset` by
node itself (with `dispatch_batches=False`) or reads on rank 0 and dispatches batches (its default). Set them in a
plain `torchrun` loop.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

from datasets import IterableDataset
from datasets.distributed import split_dataset_by_node

from .annotations import clean_caption
from .decoding import IMAGE_EXTENSIONS, decode_text, parse_json
from .skips import BadFileError, BadSampleError, SkipReport
from .text import MAX_WORDS

CAPTION_EXTENSIONS = ("txt", "caption", "text")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_pattern(pattern: str) -> list[str]:
    match = _BRACES.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        return [
            pattern[: match.start()] + str(number).zfill(len(first)) + pattern[match.end() :]
            for number in range(int(first), int(last) + 1)
        ]
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern]


def expand_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from paths, globs (`data/*.tar`) or webdataset's brace ranges (`data/{00000..00099}.tar`)."""
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    return [path for pattern in patterns for path in _expand_pattern(os.fspath(pattern))]


def _matching_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """`expand_shards`, refusing a pattern that matches nothing (a typo would otherwise train on no data)."""
    shard_list = expand_shards(shards)
    if not shard_list:
        raise FileNotFoundError(f"no shards match {shards!r}")
    return shard_list


def _split(dataset: IterableDataset, rank: int | None, world_size: int | None) -> IterableDataset:
    if world_size is None or world_size <= 1:
        return dataset
    return split_dataset_by_node(dataset, rank=rank or 0, world_size=world_size)


# ---------------------------------------------------------------------------------------------------------------
# webdataset
# ---------------------------------------------------------------------------------------------------------------


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name, the rest the extension."""
    directory, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(directory, stem), extension.lower()


def tar_samples(shard: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a webdataset tar, in order, as read from it: (key, {extension: bytes}) for each run of
    consecutive members that share a key (`images/0001.jpg` and `images/0001.json` are sample `images/0001`).

    Nothing is decoded or checked: a sample without an image or a caption is yielded like any other (the loaders
    decide what a sample needs). The tar is read in one streaming pass (plain or compressed); a broken one raises
    `tarfile.TarError`, OSError or EOFError part-way, after the samples before the break.
    """
    key, files = None, {}
    with tarfile.open(shard, mode="r|*") as tar:  # streaming mode: one pass, no seeking
        for member in tar:
            if not member.isfile():
                continue
            member_key, extension = _split_member_name(member.name)
            if member_key != key and files:
                yield key, files
                files = {}
            key = member_key
            files[extension] = tar.extractfile(member).read()
    if files:
        yield key, files


def _webdataset_example(
    shard: str, key: str, files: dict[str, bytes], metadata_fields: Sequence[str], max_words: int
) -> dict[str, Any]:
    source = f"{shard}/{key}"
    image_extension = next((ext for ext in IMAGE_EXTENSIONS if ext in files), None)
    if image_extension is None:
        raise BadSampleError(source, "missing_field", f"no image among {sorted(files)}")
    metadata = parse_json(files["json"], f"{source}.json") if "json" in files else {}
    if not isinstance(metadata, dict):
        raise BadSampleError(f"{source}.json", "malformed_json", "not a JSON object")
    caption_extension = next((ext for ext in CAPTION_EXTENSIONS if ext in files), None)
    if caption_extension is not None:
        text = decode_text(files[caption_extension], f"{source}.{caption_extension}")
    elif metadata.get("caption") is not None:
        text = metadata["caption"]
    else:
        raise BadSampleError(source, "missing_field", "no caption (.txt or 'caption' in .json)")
    return {
        "image": {"bytes": files[image_extension], "path": f"{source}.{image_extension}"},
        "caption": clean_caption(text, source, max_words),
        "key": key,
        **{name: metadata.get(name) for name in metadata_fields},
    }


def _webdataset_examples(
    shards: list[str], metadata_fields: tuple[str, ...], max_words: int, report: SkipReport
) -> Iterator[dict[str, Any]]:
    for shard in shards:
        try:
            for key, files in tar_samples(shard):
                try:
                    yield _webdataset_example(shard, key, files, metadata_fields, max_words)
                except BadSampleError as error:
                    report.record(error)
        except BadSampleError:  # strict mode: a sample's own error, already naming its file
            raise
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:  # zlib and gzip errors are OSErrors
            reason = "missing_file" if not os.path.exists(shard) else "broken_shard"
            report.record(BadFileError(shard, reason, f"{type(error).__name__}: {error}"))


def load_webdataset(
    shards: str | os.PathLike | Sequence[str | os.PathLike],
    metadata_fields: Sequence[str] = (),
    max_words: int = MAX_WORDS["pretrain"],
    rank: int | None = None,
    world_size: int | None = None,
    report: SkipReport | None = None,
) -> IterableDataset:
    """Stream image-text pairs from webdataset tar shards (CC3M, CC12M, SBU, LAION as img2dataset writes them).

    Each sample is the members sharing a key: an image (`.jpg`, `.png`, ...) and a caption (`.txt`, or the
    `caption` field of `.json`). Examples are `{"image": {"bytes", "path"}, "caption", "key"}` plus
    `metadata_fields` taken from the `.json` member (None where missing).

    Args:
        shards: paths, a glob, or a brace range such as `laion/{00000..01023}.tar`.
        metadata_fields: `.json` fields to keep (e.g. `("url", "similarity")`).
        max_words: `pre_caption` limit.
        rank, world_size: split the shards across ranks (see the module docstring for Trainer).
        report: where skipped samples and broken shards are counted.
    """
    shard_list = _matching_shards(shards)
    report = report if report is not None else SkipReport()
    dataset = IterableDataset.from_generator(
        _webdataset_examples,
        # `datasets` shards every list in gen_kwargs across workers: only `shards` may be a list.
        gen_kwargs={
            "shards": shard_list,
            "metadata_fields": tuple(metadata_fields),
            "max_words": max_words,
            "report": report,
        },
    )
    return _split(dataset, rank, world_size)


# ---------------------------------------------------------------------------------------------------------------
# parquet
# ---------------------------------------------------------------------------------------------------------------


def _parquet_row(
    row: dict[str, Any], source: str, image_columns: tuple[str, ...], caption_column: str | None, max_words: int
) -> dict[str, Any]:
    for name in image_columns:
        value = row.get(name)
        if isinstance(value, (bytes, bytearray)):  # a plain binary column
            row[name] = {"bytes": bytes(value), "path": None}
        elif value is None:
            raise BadSampleError(source, "missing_field", f"no {name!r}")
    if caption_column is not None and caption_column in row:
        row[caption_column] = clean_caption(row[caption_column], source, max_words)
    return row


def _parquet_examples(
    shards: list[str],
    image_columns: tuple[str, ...],
    caption_column: str | None,
    max_words: int,
    report: SkipReport,
) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for shard in shards:
        try:
            parquet_file = pq.ParquetFile(shard)
            row_index = 0
            for batch in parquet_file.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    try:
                        yield _parquet_row(row, f"{shard}:{row_index}", image_columns, caption_column, max_words)
                    except BadSampleError as error:
                        report.record(error)
                    row_index += 1
        except BadSampleError:  # strict mode: a row's own error, already naming its file
            raise
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for damaged files
            reason = "missing_file" if not os.path.exists(shard) else "broken_shard"
            report.record(BadFileError(shard, reason, f"{type(error).__name__}: {error}"))


def stream_parquet(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    image_columns: Sequence[str] = ("image",),
    caption_column: str | None = "caption",
    max_words: int = MAX_WORDS["pretrain"],
    rank: int | None = None,
    world_size: int | None = None,
    report: SkipReport | None = None,
) -> IterableDataset:
    """Stream rows of parquet files (one file per shard), images as bytes, captions cleaned.

    Image columns may be `datasets.Image` structs or plain binary; broken files are reported and skipped.
    """
    report = report if report is not None else SkipReport()
    dataset = IterableDataset.from_generator(
        _parquet_examples,
        gen_kwargs={
            "shards": _matching_shards(files),
            "image_columns": tuple(image_columns),
            "caption_column": caption_column,
            "max_words": max_words,
            "report": report,
        },
    )
    return _split(dataset, rank, world_size)
