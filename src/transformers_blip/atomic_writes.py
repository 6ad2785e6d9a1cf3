"""Writes that are whole or absent: a file or a directory is built under a temporary name beside its target,
flushed to disk, and renamed into place in one step, so a crash or SIGKILL never leaves a half-written result
under the name a reader trusts.

- `atomic_file` / `write_bytes_atomically` / `write_text_atomically`: one file (caption files, shards, manifests).
- `atomic_directory`: a directory filled by any writer (exports, datasets), published when the block ends.
- `publish_directory`: the final rename of a finished directory (checkpoints use it directly).
- `remove_directory`: a deletion that never leaves a half-deleted directory under its name.

Temporary names start with a dot and carry `.partial-`, so globs such as `checkpoint-*` or `*.tar` never see them.
One left behind by a killed process is safe to delete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PARTIAL_MARK = ".partial-"


def partial_path(target: str | os.PathLike, tag: str | None = None) -> Path:
    """A hidden temporary name beside `target`: `.{name}.partial-{tag}` (a fresh unique tag by default)."""
    target = Path(os.path.abspath(target))  # "out/" and "." have a name to put beside them
    tag = tag if tag is not None else f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return target.with_name(f".{target.name}{PARTIAL_MARK}{tag}")


def is_partial(path: str | os.PathLike) -> bool:
    """Whether `path` names a temporary file or directory of this module (never a finished result)."""
    name = Path(path).name
    return name.startswith(".") and PARTIAL_MARK in name


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the entries of `directory` (a rename, a new file) durable; a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows opens no directories; its renames are durable through the file system's journal
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(directory: str | os.PathLike) -> None:
    """Flush every file and folder under `directory` to disk, so that a rename of it publishes finished data."""
    for folder, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(folder)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; when the block ends without an error it is flushed and
    renamed to `path` (replacing an older file in one step). On an error the temporary file is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = partial_path(path)
    try:
        with open(temporary, mode, encoding=encoding if "b" not in mode else None) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through `atomic_file`; returns the path."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through `atomic_file`; returns the path."""
    with atomic_file(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def is_empty_or_absent(directory: str | os.PathLike) -> bool:
    """Whether `directory` may be written without replacing anything: it does not exist, or is an empty folder."""
    directory = Path(directory)
    return not directory.exists() or (directory.is_dir() and not any(directory.iterdir()))


def remove_directory(directory: str | os.PathLike) -> None:
    """Delete `directory`: first renamed to a hidden temporary name, so that a kill during the deletion leaves
    either the whole directory or nothing under its name."""
    directory = Path(directory)
    if not directory.exists():
        return
    doomed = partial_path(directory, tag=f"deleted-{uuid.uuid4().hex[:8]}")
    os.rename(directory, doomed)
    fsync_directory(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def publish_directory(finished: str | os.PathLike, target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rename the finished directory `finished` to `target` once its files are on disk.

    An empty `target` is replaced. A non-empty one is refused with `FileExistsError` unless `overwrite`, which
    moves it aside first and deletes it afterwards (a reader sees the old directory, then briefly none, then the new
    one; never a mixture). A concurrent writer that publishes first wins the refusal race the same way.
    """
    finished, target = Path(finished), Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory")
    fsync_tree(finished)
    for _ in range(3):
        if overwrite and not is_empty_or_absent(target):
            remove_directory(target)
        try:
            os.rename(finished, target)
            break
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not overwrite:
                raise FileExistsError(
                    f"{target} is not empty (another run wrote it first?); pass overwrite to replace it"
                ) from error
            # another writer published between our removal and our rename: replace theirs on the next try
    else:
        raise FileExistsError(f"{target} kept being replaced by other writers; not published")
    fsync_directory(target.parent)
    return target


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `target` to write into; published to `target` when the block ends without an
    error (see `publish_directory`), removed otherwise.

    A non-empty `target` is refused before any work starts unless `overwrite`; the check is repeated at the rename,
    since another run may have finished in the meantime.
    """
    target = Path(target)
    if not overwrite and not is_empty_or_absent(target):
        raise FileExistsError(f"{target} is not empty; pass overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = partial_path(target)
    staging.mkdir()
    try:
        yield staging
        publish_directory(staging, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "PARTIAL_MARK",
    "atomic_directory",
    "atomic_file",
    "fsync_directory",
    "fsync_tree",
    "is_empty_or_absent",
    "is_partial",
    "partial_path",
    "publish_directory",
    "remove_directory",
    "write_bytes_atomically",
    "write_text_atomically",
]
