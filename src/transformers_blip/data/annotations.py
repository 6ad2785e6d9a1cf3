"""Reading annotation records and cleaning their text, shared by the file loaders and the streaming readers.

Every function names the record it was given (`file:index`, `file:line`, `shard:member`) in the `BadSampleError` it
raises, so that a skip report says where each lost sample was.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .decoding import decode_text, parse_json
from .skips import BadFileError, BadSampleError, SkipReport
from .text import pre_caption

PathLike = str | os.PathLike


# Bytes that are not UTF-8, as `errors="surrogateescape"` keeps them: lone surrogates U+DC80..U+DCFF.
_UNDECODABLE = re.compile("[\udc80-\udcff]")


def _has_undecodable_text(value: Any) -> bool:
    if isinstance(value, str):
        return _UNDECODABLE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_undecodable_text(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_undecodable_text(item) for item in value)
    return False


def checked_record(record: Any, source: str) -> Any:
    if _has_undecodable_text(record):
        raise BadSampleError(source, "bad_text_encoding", "text that is not UTF-8")
    return record


def read_annotations(path: PathLike, report: SkipReport) -> Iterator[tuple[str, Any]]:
    """(source, record) for every record of a JSON list file or a JSON-lines (`.jsonl`) file.

    The source names the file and the position (`file:index` for lists, `file:line` for lines). A record holding
    bytes that are not UTF-8 is skipped alone (the file is read with those bytes kept aside, not replaced), as is a
    malformed line of a JSON-lines file and a record that is not a JSON object (every record yielded is a dict). A
    JSON list file that does not parse, or whose top level is not a list of records, is recorded as one unreadable
    file (`BadFileError`). A missing file raises `FileNotFoundError`: a wrong path is a mistake in the command, not a
    bad sample.
    """
    path = os.fspath(path)
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    records = _json_lines(path, text, report) if path.endswith(".jsonl") else _json_list(path, text, report)
    for source, record in records:
        try:
            yield source, checked_record(_as_object(record, source), source)
        except BadSampleError as error:
            report.record(error)


def _json_lines(path: str, text: str, report: SkipReport) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = parse_json(line, source)
        except BadSampleError as error:
            report.record(error)
            continue
        yield source, record


def _json_list(path: str, text: str, report: SkipReport) -> Iterator[tuple[str, Any]]:
    try:
        records = _records_of(parse_json(text, path), path)
    except BadSampleError as error:
        report.record(BadFileError(path, error.reason, error.detail))
        return
    for index, record in enumerate(records):
        yield f"{path}:{index}", record


def _records_of(document: Any, path: str) -> list:
    """The list of records of a parsed JSON file: the document itself, or the one list an object wraps."""
    if isinstance(document, dict):  # some releases wrap the list, e.g. {"annotations": [...]}
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise BadSampleError(path, "malformed_json", f"an object with the lists {lists}, not one list of records")
        return document[lists[0]]
    if not isinstance(document, list):
        raise BadSampleError(path, "malformed_json", f"the top level is a JSON {_json_type(document)}, not a list")
    return document


def _as_object(record: Any, source: str) -> dict:
    if not isinstance(record, dict):
        raise BadSampleError(source, "malformed_json", f"a JSON {_json_type(record)}, not an object")
    return record


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def required_field(record: Any, name: str, source: str, expected: type | tuple[type, ...] = object) -> Any:
    """`record[name]`, or `BadSampleError(missing_field)` if the record lacks it or it has the wrong type."""
    if not isinstance(record, dict) or record.get(name) is None:
        raise BadSampleError(source, "missing_field", f"no {name!r}")
    if not isinstance(record[name], expected):
        raise BadSampleError(source, "missing_field", f"{name!r} is a {type(record[name]).__name__}")
    return record[name]


def clean_caption(text: Any, source: str, max_words: int) -> str:
    """`pre_caption`, raising `BadSampleError` for a caption that is not text or has no words."""
    if isinstance(text, bytes):
        text = decode_text(text, source)
    if not isinstance(text, str):
        raise BadSampleError(source, "missing_field", f"caption is {type(text).__name__}, not text")
    caption = pre_caption(text, max_words)
    if not caption:
        raise BadSampleError(source, "empty_caption")
    return caption


def clean_caption_list(texts: Any, source: str, max_words: int, report: SkipReport) -> list[str]:
    """Clean every caption of a list (or one text), skipping (and recording) the empty ones."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise BadSampleError(source, "missing_field", f"captions are a {type(texts).__name__}, not a list of texts")
    captions = []
    for index, text in enumerate(texts):
        try:
            captions.append(clean_caption(text, f"{source}#{index}", max_words))
        except BadSampleError as error:
            report.record(error)
    if not captions:
        raise BadSampleError(source, "empty_caption", "no usable caption")
    return captions


_INT64_LIMIT = 2**63


def stable_id(value: Any) -> int:
    """A non-negative int64 for an id as a record writes it, the same in every file, process and run.

    A non-negative integer (or a string of its digits, such as "391895") is kept; any other value ("coco_391895",
    "flickr_391895", a file name) becomes a 63-bit hash of its text, so distinct ids stay distinct across files and
    sources, as ITC needs: it takes pairs with equal ids as positives.
    """
    if isinstance(value, str) and value.isascii() and value.isdigit() and str(int(value)) == value:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _INT64_LIMIT:
        return value
    digest = hashlib.blake2b(str(value).encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: non-negative in int64
