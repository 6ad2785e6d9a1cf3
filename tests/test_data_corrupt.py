"""Every kind of bad input goes through a DataLoader with workers: the run finishes, every skip is counted with its
reason, and strict mode raises naming the file."""

import io
import json
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from transformers_blip.benchmark.export import write_webdataset_shards
from transformers_blip.data import (
    BadSampleError,
    BlipEvalTransform,
    BlipTrainTransform,
    DecodeImages,
    SkippingCollator,
    SkipReport,
    load_image_folder,
    load_webdataset,
)


def encode(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def noise_image(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def png_bomb() -> bytes:
    """A tiny PNG whose header claims 100000 x 100000 pixels."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def sixteen_bit() -> Image.Image:
    return Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)


# Images that decode (odd modes included): file name -> bytes.
GOOD_IMAGES = {
    "rgb0.png": lambda: encode(noise_image(seed=0)),
    "rgb1.jpg": lambda: encode(noise_image(seed=1), "JPEG"),
    "rgb2.png": lambda: encode(noise_image(seed=2)),
    "grey.png": lambda: encode(noise_image().convert("L")),
    "grey_alpha.png": lambda: encode(noise_image().convert("LA")),
    "palette.png": lambda: encode(noise_image().convert("P")),
    "rgba.png": lambda: encode(noise_image().convert("RGBA")),
    "cmyk.jpg": lambda: encode(noise_image().convert("CMYK"), "JPEG"),
    "sixteen_bit.tif": lambda: encode(sixteen_bit(), "TIFF"),
}
# Images that cannot be used: file name -> (bytes, or None for a file that does not exist; expected reason).
BAD_IMAGES = {
    "truncated.jpg": (lambda: encode(noise_image(64), "JPEG")[:1500], "truncated_image"),
    "garbage.png": (lambda: bytes(np.random.default_rng(0).integers(0, 255, 500, dtype=np.uint8)), "unreadable_image"),
    "zero_bytes.png": (lambda: b"", "empty_file"),
    "missing.png": (None, "missing_file"),
    "one_pixel.png": (lambda: encode(Image.new("RGB", (1, 1))), "too_small"),
    "bomb.png": (png_bomb, "too_large"),
}
# Metadata lines that cannot be used, and their reasons.
BAD_LINES = [
    (b'{"file_name": "rgb0.png", "caption": ""}', "empty_caption"),
    (b'{"file_name": "rgb0.png", "caption": "   \\n\\t "}', "empty_caption"),
    (b'{"file_name": "rgb0.png", "caption": "..."}', "empty_caption"),
    (b'{"file_name": "rgb0.png", "caption": "caf\xe9 au lait"}', "bad_text_encoding"),
    (b'{"file_name": "rgb0.png", "caption": ', "malformed_json"),
    (b'{"caption": "no file name"}', "missing_field"),
]


def make_folder(root, bad_lines=BAD_LINES, bad_images=BAD_IMAGES):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, make in GOOD_IMAGES.items():
        (root / name).write_bytes(make())
        lines.append(json.dumps({"file_name": name, "caption": f"A picture called {name}."}).encode())
    for name, (make, _) in bad_images.items():
        if make is not None:
            (root / name).write_bytes(make())
        lines.append(json.dumps({"file_name": name, "caption": "a broken picture"}).encode())
    lines += [line for line, _ in bad_lines]
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def expected_counts(bad_lines=BAD_LINES, bad_images=BAD_IMAGES) -> Counter:
    return Counter([reason for _, reason in bad_lines] + [reason for _, reason in bad_images.values()])


def run_epoch(dataset, batch_size=4, num_workers=2):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=SkippingCollator())
    batches = iter(loader)
    kept = []
    try:
        for batch in batches:
            if batch is None:  # every sample of the batch was bad
                continue
            assert batch["image"].shape[1:] == (3, 16, 16)
            kept += batch["caption"]
    finally:
        # Stop the workers now: an error's traceback would keep the iterator alive until garbage collection,
        # which may close its queues first and leave the workers to time out.
        if hasattr(batches, "_shutdown_workers"):
            batches._shutdown_workers()
    return kept


def test_every_bad_input_is_skipped_and_counted_exactly(tmp_path, capsys):
    folder = make_folder(tmp_path / "data")
    report = SkipReport(tmp_path / "skips")
    dataset = load_image_folder(folder, report=report)
    # Text problems are found while loading, image problems while decoding in the workers.
    assert len(dataset) == len(GOOD_IMAGES) + len(BAD_IMAGES)
    dataset.set_transform(DecodeImages(BlipEvalTransform(16), report=report))

    kept = run_epoch(dataset)

    assert sorted(kept) == sorted(f"a picture called {name.replace('.', ' ')}" for name in GOOD_IMAGES)
    assert report.counts() == expected_counts()
    sources = {entry.source for entry in report.skipped}
    assert {str(folder / name) for name in BAD_IMAGES} <= sources
    assert f"{folder / 'metadata.jsonl'}:{len(GOOD_IMAGES) + len(BAD_IMAGES) + 5}" in sources  # the malformed line

    summary = report.finish(tmp_path / "skipped.jsonl")
    total = len(BAD_LINES) + len(BAD_IMAGES)
    assert summary.startswith(f"Skipped {total} samples: 3 empty_caption, ")
    assert summary in capsys.readouterr().out
    written = [json.loads(line) for line in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert Counter(entry["reason"] for entry in written) == expected_counts()


def test_counts_are_exact_over_epochs_and_without_workers(tmp_path):
    folder = make_folder(tmp_path / "data", bad_lines=[])
    report = SkipReport(tmp_path / "skips")
    dataset = load_image_folder(folder, report=report)
    dataset.set_transform(DecodeImages(BlipEvalTransform(16), report=report))
    run_epoch(dataset, num_workers=2)
    run_epoch(dataset, num_workers=0)
    assert report.counts() == Counter({reason: 2 for _, reason in BAD_IMAGES.values()})


def test_flip_safe_text_goes_through_decode(tmp_path):
    folder = make_folder(tmp_path / "data", bad_lines=[], bad_images={})
    dataset = load_image_folder(folder)
    transform = BlipTrainTransform(16, seed=0)
    dataset.set_transform(DecodeImages(transform, text_columns=["caption"]))
    row = dataset[0]
    assert row["image"].shape == (3, 16, 16) and row["caption"] == "a picture called rgb0 png"


def test_strict_mode_raises_naming_the_annotation_line(tmp_path):
    folder = make_folder(tmp_path / "data", bad_images={})
    with pytest.raises(BadSampleError, match=r"metadata\.jsonl:\d+: empty_caption"):
        load_image_folder(folder, report=SkipReport(tmp_path / "skips", strict=True))


def test_strict_mode_raises_from_a_worker_naming_the_image(tmp_path):
    folder = make_folder(tmp_path / "data", bad_lines=[], bad_images={"truncated.jpg": BAD_IMAGES["truncated.jpg"]})
    report = SkipReport(tmp_path / "skips", strict=True)
    dataset = load_image_folder(folder, report=report)
    dataset.set_transform(DecodeImages(BlipEvalTransform(16), report=report))
    with pytest.raises(BadSampleError, match=r"truncated\.jpg: truncated_image"):
        run_epoch(dataset, num_workers=2)


# ---------------------------------------------------------------------------------------------------------------
# Streaming: bad samples inside shards, and broken shards
# ---------------------------------------------------------------------------------------------------------------


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def good_samples(prefix, count):
    png = encode(noise_image())
    return [(f"{prefix}{i:03d}", png, f"{prefix} sample {i}", {"index": i}) for i in range(count)]


def make_shards(directory):
    """Three good shards of 4, one shard of bad samples, one truncated, one not a tar, one missing."""
    paths = []
    for shard in range(3):
        paths += write_webdataset_shards(iter(good_samples(f"s{shard}_", 4)), directory, f"good{shard}", 10)
    bad = directory / "bad-00000.tar"
    with tarfile.open(bad, "w") as tar:
        add_member(tar, "ok.png", encode(noise_image()))
        add_member(tar, "ok.txt", b"a good sample among bad ones")
        add_member(tar, "nocaption.png", encode(noise_image()))
        add_member(tar, "latin1.png", encode(noise_image()))
        add_member(tar, "latin1.txt", b"caf\xe9")
        add_member(tar, "badjson.png", encode(noise_image()))
        add_member(tar, "badjson.json", b"{not json")
        add_member(tar, "emptytext.png", encode(noise_image()))
        add_member(tar, "emptytext.txt", b"  ")
        add_member(tar, "noimage.txt", b"a caption without its image")
        add_member(tar, "zerobytes.png", b"")
        add_member(tar, "zerobytes.txt", b"an empty image file")
    paths.append(bad)
    # Truncated inside the third sample's image: the first two samples survive, the rest of the shard is lost.
    truncated = write_webdataset_shards(iter(good_samples("t", 4)), directory, "truncated", 10)[0]
    with tarfile.open(truncated) as tar:
        third_image = [m for m in tar.getmembers() if m.name == "t002.png"][0]
    truncated.write_bytes(truncated.read_bytes()[: third_image.offset_data + 100])
    paths.append(truncated)
    not_a_tar = directory / "garbage-00000.tar"
    not_a_tar.write_bytes(b"this is not a tar archive" * 40)
    paths.append(not_a_tar)
    paths.append(directory / "missing-00000.tar")
    return [str(p) for p in paths]


def test_streaming_skips_bad_samples_and_broken_shards(tmp_path):
    shards = make_shards(tmp_path / "shards")
    report = SkipReport(tmp_path / "skips")
    stream = load_webdataset(shards, report=report).map(
        DecodeImages(BlipEvalTransform(16), report=report), batched=True, batch_size=4
    )
    loader = DataLoader(stream, batch_size=3, num_workers=2, collate_fn=SkippingCollator())
    captions = [caption for batch in loader if batch is not None for caption in batch["caption"]]

    expected = [f"s{shard}_ sample {i}" for shard in range(3) for i in range(4)]
    expected += ["a good sample among bad ones", "t sample 0", "t sample 1"]
    assert sorted(captions) == sorted(expected)
    assert report.counts() == Counter(
        {
            "missing_field": 2,  # nocaption, noimage
            "bad_text_encoding": 1,
            "malformed_json": 1,
            "empty_caption": 1,
            "empty_file": 1,  # zerobytes.png, found when decoding
        }
    )
    # Shards that break are files whose unread samples are unknown: listed as files, not counted as samples.
    unreadable = {(entry.source, entry.reason) for entry in report.unreadable_files}
    assert unreadable == {(shards[-3], "broken_shard"), (shards[-2], "broken_shard"), (shards[-1], "missing_file")}
    assert "Could not read 3 files to the end" in report.summary()


def test_streaming_strict_mode_names_the_member(tmp_path):
    shards = make_shards(tmp_path / "shards")
    stream = load_webdataset(shards[3:4], report=SkipReport(tmp_path / "skips", strict=True))
    with pytest.raises(BadSampleError, match=r"bad-00000\.tar/nocaption: missing_field"):
        list(stream)


def test_torch_sees_no_bad_sample(tmp_path):
    """The collated batches hold only finite tensors: nothing half-decoded slips through."""
    folder = make_folder(tmp_path / "data", bad_lines=[])
    dataset = load_image_folder(folder)
    dataset.set_transform(DecodeImages(BlipEvalTransform(16)))
    loader = DataLoader(dataset, batch_size=5, collate_fn=SkippingCollator())
    batches = [batch for batch in loader if batch is not None]
    assert sum(len(batch["caption"]) for batch in batches) == len(GOOD_IMAGES)
    assert all(torch.isfinite(batch["image"]).all() for batch in batches)
