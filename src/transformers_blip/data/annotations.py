"""Reading annotation records and cleaning their text, shared by the file loaders and the streaming readers.

Every function names the record it was given (`file:index`, `file:line`, `shard:member`) in the `BadSampleError` it
raises, so that a skip report says where each lost sample was.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .decoding import decode_text, parse_json
from .skips import BadSampleError, SkipReport
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
    malformed line of a JSON-lines file; a JSON list that does not parse is skipped whole. A missing file raises
    `FileNotFoundError`: a wrong path is a mistake in the command, not a bad sample.
    """
    path = os.fspath(path)
    text = Path(path).read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if path.endswith(".jsonl"):
        lines = ((f"{path}:{number}", line) for number, line in enumerate(text.splitlines(), start=1))
        parsed = ((source, line) for source, line in lines if line.strip())
    else:
        parsed = iter([(path, text)])
    for source, chunk in parsed:
        try:
            records = parse_json(chunk, source)
        except BadSampleError as error:
            report.record(error)
            continue
        if path.endswith(".jsonl"):
            records = [(source, records)]
        else:
            if isinstance(records, dict):  # some releases wrap the list, e.g. {"annotations": [...]}
                records = next((value for value in records.values() if isinstance(value, list)), [])
            records = [(f"{path}:{index}", record) for index, record in enumerate(records)]
        for record_source, record in records:
            try:
                yield record_source, checked_record(record, record_source)
            except BadSampleError as error:
                report.record(error)


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
    """Clean every caption of a list, skipping (and recording) the empty ones."""
    if isinstance(texts, str):
        texts = [texts]
    captions = []
    for index, text in enumerate(texts):
        try:
            captions.append(clean_caption(text, f"{source}#{index}", max_words))
        except BadSampleError as error:
            report.record(error)
    if not captions:
        raise BadSampleError(source, "empty_caption", "no usable caption")
    return captions
