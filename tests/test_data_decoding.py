"""Robust image decoding: every bad input becomes a typed error naming the file and the reason; odd modes are
converted properly; the skip report counts across processes."""

import io
import pickle
import struct
import zlib
from multiprocessing import get_context

import numpy as np
import pytest
from PIL import Image

from transformers_blip.data import BadSampleError, SkipReport, decode_text, load_image, to_rgb


def encode(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header claims a huge size (what a decompression bomb looks like before decoding)."""
    data = bytearray(encode(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def noise(size=(24, 24)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size, 3), dtype=np.uint8))


def reason_for(source, **limits) -> str:
    with pytest.raises(BadSampleError) as caught:
        load_image(source, **limits)
    return caught.value.reason


def test_good_inputs_of_every_kind(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(encode(noise()))
    for source in (path, str(path), encode(noise()), {"bytes": encode(noise()), "path": None}, {"path": str(path)}):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (24, 24)


def test_bad_inputs_name_the_reason(tmp_path):
    good = encode(noise((64, 64)), "JPEG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_for(tmp_path / "missing.jpg") == "missing_file"
    assert reason_for(tmp_path / "empty.jpg") == "empty_file"
    assert reason_for(b"") == "empty_file"
    assert reason_for(b"definitely not an image") == "unreadable_image"
    assert reason_for(good[: len(good) // 2]) == "truncated_image"
    assert reason_for(encode(Image.new("RGB", (1, 1)))) == "too_small"
    assert reason_for(png_bomb()) == "too_large"
    assert reason_for(encode(noise((40, 40))), max_pixels=1000) == "too_large"
    assert reason_for({"bytes": None, "path": None}) == "missing_field"


def test_error_names_the_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG garbage")
    with pytest.raises(BadSampleError, match=r"broken\.png: unreadable_image") as caught:
        load_image(path)
    assert caught.value.source == str(path)


def test_bomb_is_refused_from_its_header_without_decoding():
    # 10^10 pixels would need 10 GB to decode; refusing costs nothing.
    assert reason_for(png_bomb(), max_pixels=10**12) in ("too_large",)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_odd_modes_become_rgb(mode):
    base = noise()
    if mode == "I;16":
        image = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    else:
        image = base.convert(mode)
    format = "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"
    decoded = load_image(encode(image, format))
    assert decoded.mode == "RGB" and decoded.size == (24, 24)
    if mode in ("L", "I;16"):  # 16-bit grey is rescaled, not clipped to white
        np.testing.assert_allclose(np.asarray(decoded)[..., 0], np.asarray(base.convert("L")), atol=1)


def test_transparent_pixels_are_laid_on_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent black
    image.paste((255, 0, 0, 255), (0, 0, 8, 16))
    pixels = np.asarray(to_rgb(image))
    assert tuple(pixels[0, 0]) == (255, 0, 0) and tuple(pixels[0, 15]) == (255, 255, 255)


def test_decode_text():
    assert decode_text("café".encode(), "x") == "café"
    assert decode_text(b"\xef\xbb\xbfhello", "x") == "hello"
    with pytest.raises(BadSampleError, match="bad_text_encoding"):
        decode_text(b"caf\xe9", "caption.txt")


def _record_in_child(report: SkipReport, name: str) -> None:
    report.record(BadSampleError(name, "missing_file"))


def test_skip_report_counts_records_from_other_processes(tmp_path, capsys):
    report = SkipReport(tmp_path / "skips")
    report.record(BadSampleError("a.jpg", "truncated_image", "cut"))
    child = get_context("fork").Process(target=_record_in_child, args=(report, "child.jpg"))
    child.start()
    child.join()
    # What a spawned worker receives: a pickled copy, writing to the same directory.
    pickle.loads(pickle.dumps(report)).record(BadSampleError("copy.jpg", "missing_file"))
    assert len(report) == 3
    assert report.counts() == {"truncated_image": 1, "missing_file": 2}
    summary = report.finish(tmp_path / "skipped.jsonl")
    assert summary == "Skipped 3 samples: 2 missing_file, 1 truncated_image"
    assert "Skipped 3 samples" in capsys.readouterr().out
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 3
    report.clear()
    assert len(report) == 0 and report.summary() == "Skipped no samples."


def test_strict_report_raises():
    with pytest.raises(BadSampleError, match="x.png: empty_file"):
        SkipReport(strict=True).record(BadSampleError("x.png", "empty_file"))
