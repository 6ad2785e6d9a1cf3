"""Streaming shards split by node and by worker: 2 ranks x 2 workers read every sample exactly once."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader

from transformers_blip.benchmark.export import write_webdataset_shards
from transformers_blip.data import SkipReport, expand_shards, load_webdataset, stream_parquet
from transformers_blip.data.streaming import tar_samples


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(directory, num_shards, per_shard):
    image = png()
    paths = []
    for shard in range(num_shards):
        samples = [
            (f"s{shard:02d}_{i:03d}", image, f"caption {shard} {i}", {"shard": shard}) for i in range(per_shard)
        ]
        paths += write_webdataset_shards(iter(samples), directory, f"part{shard:02d}", per_shard)
    return sorted(str(p) for p in paths)


def keys_read(dataset, num_workers=2):
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return [example["key"] for example in loader]


@pytest.mark.parametrize("num_shards", [8, 5])  # shards divide evenly among ranks, or not
def test_two_ranks_two_workers_read_every_sample_exactly_once(tmp_path, num_shards):
    shards = write_shards(tmp_path / "shards", num_shards, per_shard=6)
    report = SkipReport(tmp_path / "skips")
    per_rank = [keys_read(load_webdataset(shards, rank=rank, world_size=2, report=report)) for rank in range(2)]
    every_key = Counter(per_rank[0] + per_rank[1])
    assert len(every_key) == num_shards * 6 and set(every_key.values()) == {1}
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 6  # both ranks do work
    assert len(report) == 0


def test_workers_split_shards_within_a_rank(tmp_path):
    shards = write_shards(tmp_path / "shards", 4, per_shard=3)
    keys = keys_read(load_webdataset(shards), num_workers=2)
    assert sorted(keys) == sorted(f"s{s:02d}_{i:03d}" for s in range(4) for i in range(3))
    # Workers take turns, so two shards are read side by side rather than one after the other.
    assert keys[:2] != ["s00_000", "s00_001"]


def test_broken_shard_is_reported_and_the_stream_continues(tmp_path):
    shards = write_shards(tmp_path / "shards", 4, per_shard=3)
    with open(shards[1], "r+b") as shard:
        shard.truncate(600)  # inside the first sample's image
    report = SkipReport(tmp_path / "skips")
    keys = keys_read(load_webdataset(shards, rank=0, world_size=1, report=report))
    assert sorted(keys) == sorted(f"s{s:02d}_{i:03d}" for s in (0, 2, 3) for i in range(3))
    assert [(entry.source, entry.reason) for entry in report.skipped] == [(shards[1], "broken_shard")]


def test_tar_samples_groups_members_by_key_and_keeps_samples_without_captions(tmp_path):
    members = [("a/0001.jpg", b"image 1"), ("a/0001.json", b"{}"), ("a/0002.PNG", b"image 2"), ("b/0001.txt", b"text")]
    path = tmp_path / "shard.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(tar_samples(path)) == [
        ("a/0001", {"jpg": b"image 1", "json": b"{}"}),  # no caption: kept, the loaders decide what a sample needs
        ("a/0002", {"png": b"image 2"}),
        ("b/0001", {"txt": b"text"}),
    ]
    path.write_bytes(path.read_bytes()[:40])  # cut inside the compressed stream
    with pytest.raises((tarfile.TarError, OSError, EOFError)):
        list(tar_samples(path))


def test_parquet_streams_split_by_rank(tmp_path):
    image = png()
    paths = []
    for part in range(4):
        data = Dataset.from_dict(
            {"image": [{"bytes": image, "path": None}] * 5, "caption": [f"Part {part} row {i}." for i in range(5)]}
        ).cast_column("image", ImageFeature())
        paths.append(str(tmp_path / f"part{part}.parquet"))
        data.to_parquet(paths[-1])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    files = paths + [str(tmp_path / "broken.parquet")]
    report = SkipReport(tmp_path / "skips")
    captions = []
    for rank in range(2):
        stream = stream_parquet(files[:4], rank=rank, world_size=2, report=report)
        captions += [row["caption"] for row in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(captions) == sorted(f"part {p} row {i}" for p in range(4) for i in range(5))
    list(stream_parquet(files, report=report))
    assert [entry.reason for entry in report.skipped] == ["broken_shard"]


def test_expand_shards(tmp_path):
    assert expand_shards("data/{000..003}.tar") == [f"data/{i:03d}.tar" for i in range(4)]
    assert expand_shards(["a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    assert expand_shards(["x/{0..1}.tar", "y.tar"]) == ["x/0.tar", "x/1.tar", "y.tar"]
    for name in ("b.tar", "a.tar"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shards(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]


@pytest.mark.parametrize("extension", ["tif", "gif", "jpeg", "webp"])
def test_every_reader_takes_the_same_image_extensions(tmp_path, extension):
    """A shard of TIFFs (or GIFs) is read like a folder of them, not skipped as holding no image."""
    import tarfile

    from transformers_blip.data import load_image_folder

    pil_format = {"tif": "TIFF", "gif": "GIF", "jpeg": "JPEG", "webp": "WEBP"}[extension]
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(buffer, format=pil_format)
    shard = tmp_path / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in ((f"a.{extension}", buffer.getvalue()), ("a.txt", b"a grey square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = SkipReport()
    streamed = list(load_webdataset([str(shard)], report=report))
    assert [row["caption"] for row in streamed] == ["a grey square"] and len(report) == 0

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / f"a.{extension}").write_bytes(buffer.getvalue())
    assert [Path(row["path"]).name for row in load_image_folder(folder)["image"]] == [f"a.{extension}"]
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": f"a.{extension}", "caption": "a grey square"}))
    assert load_image_folder(folder)["caption"] == ["a grey square"]
