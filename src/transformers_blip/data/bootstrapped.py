"""Reading CapFilt's output back: the manifest of a bootstrapped directory and the pairs its shards hold.

`transformers_blip.capfilt.bootstrap` writes, for each input shard, a data file of kept (image, text) records
(`data-{shard}.parquet`, or `.tar` in webdataset's layout), a table of every text it scored (`scores-{shard}.parquet`,
no images) and a marker (`shard-{shard}.json`) with the sizes and SHA-256 hashes of both, committed last. When every
shard is done, `manifest.json` lists them all in input order. Readers trust the manifest only: a file whose size or
hash differs from it is an error, never silently read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from datasets import Dataset, IterableDataset

from .loaders import load_parquet
from .skips import SkipReport
from .streaming import load_webdataset

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "transformers-blip-capfilt"
MANIFEST_VERSION = 1


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """`{"size", "sha256"}` of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def read_capfilt_manifest(output_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a finished CapFilt run, or an error naming the directory when the run is not finished."""
    path = Path(output_dir) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{output_dir} has no {MANIFEST_NAME}: the CapFilt run there has not finished")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a CapFilt manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')} is not {MANIFEST_VERSION}")
    return manifest


def capfilt_files(output_dir: str | os.PathLike, kind: str = "data", verify: bool = True) -> list[Path]:
    """The `kind` files (`"data"`: kept records, `"scores"`: every scored text) of a finished run, in input order.

    With `verify`, each file's size and hash are checked against the manifest; a mismatch raises `ValueError`.
    """
    if kind not in ("data", "scores"):
        raise ValueError(f"kind must be 'data' or 'scores', not {kind!r}")
    output_dir = Path(output_dir)
    paths = []
    for shard in read_capfilt_manifest(output_dir)["shards"]:
        name = shard[f"{kind}_file"]
        path = output_dir / name
        if verify and file_digest(path) != shard["files"][name]:
            raise ValueError(f"{path} differs from the size and hash its manifest records: the output was altered")
        paths.append(path)
    return paths


def load_capfilt_output(
    output_dir: str | os.PathLike, report: SkipReport | None = None, verify: bool = True
) -> Dataset | IterableDataset:
    """The kept pairs of a finished CapFilt run: columns image, caption, source (`web` / `synthetic`), itm_score,
    itc_similarity, key, image_id and the image's counts. Parquet output is a `Dataset`, webdataset output a stream.

    `pretrain.py` reads the same files with `--source parquet --train_files DIR/data-*.parquet` (or
    `--source webdataset`).
    """
    manifest = read_capfilt_manifest(output_dir)
    files = [os.fspath(path) for path in capfilt_files(output_dir, "data", verify)]
    if manifest["settings"].get("output_format") == "webdataset":
        return load_webdataset(files, metadata_fields=manifest["metadata_fields"], report=report)
    return load_parquet(files, report=report)


__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "capfilt_files",
    "file_digest",
    "load_capfilt_output",
    "read_capfilt_manifest",
]
