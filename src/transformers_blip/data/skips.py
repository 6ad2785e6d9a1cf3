"""Bad samples: the error that names one, and the report that counts them exactly, across processes.

A loader or transform that meets a bad input raises `BadSampleError(source, reason)` internally and hands it to a
`SkipReport`; a file that cannot be read to its end (a JSON list that does not parse, a broken shard) raises
`BadFileError`, which the report counts as a file, not as one sample, since the records it held are unknown. In the
default mode the report writes one line to a log file of the current process and the sample is dropped; in strict
mode the report raises the error instead, so the run stops with the file and the reason named.

Why files: decoding happens in DataLoader worker processes (and on several ranks), whose memory the main process
never sees. Each process appends to its own file in the report's `log_dir`, one line per skipped sample, written as
it happens; reading the directory back gives an exact count however the workers were started or stopped. For a
multi-node run, give every rank the same `log_dir` on a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

# The reasons used across the data package, for reference in reports and tests.
SKIP_REASONS = (
    "missing_file",  # the path does not exist
    "empty_file",  # zero bytes
    "unreadable_image",  # not an image, or a decoder error
    "truncated_image",  # the image data ends early
    "too_large",  # more pixels than the limit (a decompression bomb, or simply absurd)
    "too_small",  # a side shorter than the limit (1x1 tracking pixels and the like)
    "empty_caption",  # no words left after cleaning
    "bad_text_encoding",  # text that is not UTF-8
    "malformed_json",  # a JSON line or file that does not parse
    "missing_field",  # a record without the image or the text it needs, or with a field of the wrong type
    "unsafe_path",  # an image path that leaves its folder (absolute, or through "..")
    "broken_shard",  # a tar or parquet file that cannot be read on (its remaining samples are lost)
)

_PROCESS_LOG_GLOB = "proc-*.jsonl"
_MESSAGES_PER_PROCESS = 10
_FILES_NAMED = 5  # in the summary; the written list has them all

logger = logging.getLogger(__name__)


class BadSampleError(ValueError):
    """A sample that cannot be used: `source` names the file (or shard member, or annotation line), `reason` says why.

    `reason` is one of `SKIP_REASONS`; `detail` carries the underlying message, if any.
    """

    def __init__(self, source: str, reason: str | None = None, detail: str = ""):
        self.source = str(source)
        self.reason = reason
        self.detail = detail
        if reason is None:
            # Rebuilt from a bare message, which is how torch's DataLoader re-raises a worker's error.
            message = self.source
        else:
            message = f"{self.source}: {reason}" + (f" ({detail})" if detail else "")
        super().__init__(message)


class BadFileError(BadSampleError):
    """A file that cannot be read to its end: `source` names the file. Its unread records cannot be counted, so the
    report lists the file instead of counting one sample."""


@dataclass(frozen=True)
class SkippedSample:
    """One skipped sample, as listed by `SkipReport`; `whole_file` marks a file that could not be read to its end."""

    source: str
    reason: str
    detail: str = ""
    whole_file: bool = False


class SkipReport:
    """Counts the samples a run skipped and why, across DataLoader workers and ranks.

    Pass the same report to the loaders and to the image decoding transform; at the end of the run call `finish()`,
    which prints a summary such as `Skipped 3 samples: 2 missing_file, 1 truncated_image` and writes the full list
    (one JSON object per line) to a file.

    Args:
        log_dir: directory for the per-process logs. A fresh temporary directory when not given; give a shared
            directory (e.g. under the run's output directory) when several ranks must be counted together. Logs
            already in the directory count too (a resumed run keeps its earlier skips); `clear()` starts afresh.
        strict: raise the `BadSampleError` instead of skipping the sample.
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, strict: bool = False):
        self.strict = strict
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="blip-skipped-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._messages_left = _MESSAGES_PER_PROCESS
        self._counting = True

    def record(self, error: BadSampleError) -> None:
        """Skip the sample `error` describes (or raise the error in strict mode)."""
        if self.strict:
            raise error
        if not self._counting:
            return
        entry = SkippedSample(error.source, error.reason or "unknown", error.detail, isinstance(error, BadFileError))
        # One short append per sample, flushed on close: the line survives even if the worker is killed next.
        with open(self._process_log(), "a", encoding="utf-8") as log:
            log.write(json.dumps(asdict(entry)) + "\n")
        self._announce(error)

    def _announce(self, error: BadSampleError) -> None:
        """Log the first few skips of each process, so that nothing goes unseen and nothing floods the log."""
        if self._messages_left > 0:
            self._messages_left -= 1
            quiet = "" if self._messages_left else " (further skips are counted without a message)"
            logger.warning(f"Skipping {error}{quiet}")

    def _process_log(self) -> Path:
        # The host name keeps two ranks with the same pid on different nodes apart.
        return self.log_dir / f"proc-{socket.gethostname()}-{os.getpid()}.jsonl"

    @contextmanager
    def not_counting(self) -> Iterator[SkipReport]:
        """Record nothing in this process inside the block (strict mode still raises): for a read that is not a pass
        of the run, such as building a vocabulary from the captions, or a process reading files another counts."""
        self._counting = False
        try:
            yield self
        finally:
            self._counting = True

    def part(self, name: str) -> SkipReport:
        """A report that writes to the subdirectory `name` and is counted with this one (its `clear()` clears only
        itself): e.g. what loading loses, which a resumed run must count once, not once per start."""
        return SkipReport(self.log_dir / name, strict=self.strict)

    @property
    def skipped(self) -> list[SkippedSample]:
        """Every skipped sample and unreadable file recorded so far, by any process, parts included."""
        entries = []
        for log_file in sorted(self.log_dir.rglob(_PROCESS_LOG_GLOB)):
            with open(log_file, encoding="utf-8") as log:
                for line in log:
                    try:
                        entries.append(SkippedSample(**json.loads(line)))
                    except (json.JSONDecodeError, TypeError):
                        continue  # a line cut short by a killed process
        return entries

    def __len__(self) -> int:
        """The number of entries: skipped samples and unreadable files."""
        return len(self.skipped)

    def counts(self) -> Counter:
        """How many samples were skipped for each reason (unreadable files are in `unreadable_files`)."""
        return Counter(entry.reason for entry in self.skipped if not entry.whole_file)

    @property
    def unreadable_files(self) -> list[SkippedSample]:
        """The files that could not be read to their end, whose unread records no count includes."""
        return [entry for entry in self.skipped if entry.whole_file]

    def summary(self) -> str:
        counts = self.counts()
        total = sum(counts.values())
        if total == 0:
            samples = "Skipped no samples."
        else:
            by_reason = ", ".join(f"{count} {reason}" for reason, count in counts.most_common())
            samples = f"Skipped {total} {'sample' if total == 1 else 'samples'}: {by_reason}"
        files = self.unreadable_files
        if not files:
            return samples
        named = ", ".join(f"{entry.source} ({entry.reason})" for entry in files[:_FILES_NAMED])
        more = f" and {len(files) - _FILES_NAMED} more" if len(files) > _FILES_NAMED else ""
        noun = "file" if len(files) == 1 else "files"
        return (
            f"{samples.removesuffix('.')}. Could not read {len(files)} {noun} to the end (their unread records are"
            f" not counted): {named}{more}."
        )

    def write(self, path: str | os.PathLike) -> Path:
        """Write every skipped sample to `path`, one JSON object per line."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            for entry in self.skipped:
                out.write(json.dumps(asdict(entry)) + "\n")
        return path

    def finish(self, path: str | os.PathLike | None = None) -> str:
        """Print the summary and write the list (to `path`, or `log_dir/skipped_samples.jsonl`); return the summary."""
        path = self.write(path if path is not None else self.log_dir / "skipped_samples.jsonl")
        summary = self.summary()
        print(f"{summary} The list is in {path}.")
        return summary

    def clear(self) -> None:
        """Forget everything recorded so far, parts included (e.g. between evaluation passes)."""
        for log_file in self.log_dir.rglob(_PROCESS_LOG_GLOB):
            log_file.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"SkipReport(log_dir={str(self.log_dir)!r}, strict={self.strict})"
