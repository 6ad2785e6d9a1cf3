"""Robust decoding: bytes or files to RGB images and to text, with every failure turned into a `BadSampleError`.

Nothing here touches PIL's global settings (`MAX_IMAGE_PIXELS`, `LOAD_TRUNCATED_IMAGES`); the original sets both
for the whole process, which lets truncated files through as half-grey images and bombs through as memory errors.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .skips import BadSampleError

# PIL's own warning threshold (about 0.27 GB of RGB). Far above any training resolution, far below a bomb.
DEFAULT_MAX_PIXELS = 89_478_485
# Below this a side is a tracking pixel, a spacer or an icon, not a picture.
DEFAULT_MIN_SIDE = 8
# The image files every reader recognises (folders by suffix, webdataset members by extension), lower case, no dot.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

ImageSource = str | os.PathLike | bytes | bytearray | dict | Image.Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def _describe(source: Any) -> str:
    """A short name for an image source, for error messages."""
    if isinstance(source, dict):
        return str(source.get("path") or "<bytes>")
    if isinstance(source, (bytes, bytearray)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return os.fspath(source)


def _open_source(source: Any, name: str) -> io.BytesIO | str | Image.Image:
    """Turn a source into something `Image.open` takes, catching missing and empty inputs first."""
    if isinstance(source, dict):
        # The layout of a `datasets.Image` value: {"bytes": ..., "path": ...}, bytes taking precedence.
        if source.get("bytes") is not None:
            return _open_source(source["bytes"], name)
        if source.get("path"):
            return _open_source(source["path"], name)
        raise BadSampleError(name, "missing_field", "image value has neither bytes nor path")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadSampleError(name, "empty_file")
        return io.BytesIO(bytes(source))
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise BadSampleError(name, "missing_file")
    if os.path.getsize(path) == 0:
        raise BadSampleError(name, "empty_file")
    return path


def _check_size(image: Image.Image, name: str, max_pixels: int, min_side: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise BadSampleError(name, "too_large", f"{width}x{height} pixels, limit {max_pixels}")
    if min(width, height) < min_side:
        raise BadSampleError(name, "too_small", f"{width}x{height} pixels, minimum side {min_side}")


def _decode_pixels(image: Image.Image, name: str) -> None:
    """Force the (lazy) decode, classifying its errors."""
    try:
        image.load()
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, zlib errors...
        reason = "truncated_image" if "truncat" in str(error).lower() else "unreadable_image"
        raise BadSampleError(name, reason, str(error)) from error


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB the way a viewer would show it.

    Transparent pixels are laid on white (their colour values are often junk), 16-bit and 32-bit greyscale are
    rescaled rather than clipped (PIL's plain `convert` turns most of a 16-bit image white), the rest goes through
    PIL's own conversion (L, P, CMYK, YCbCr, 1, ...).
    """
    if image.mode == "RGB":
        return image
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode in _SIXTEEN_BIT_MODES else max(float(values.max()), 255.0)
        grey = np.clip(values * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return image.convert("RGB")


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    name: str | None = None,
) -> Image.Image:
    """Decode an image into an RGB PIL image, or raise `BadSampleError` naming the file and the reason.

    Args:
        source: a path, encoded bytes, a `datasets.Image` value (`{"bytes": ..., "path": ...}`) or a PIL image.
        max_pixels: refuse images with more pixels than this (`too_large`), checked from the header before any
            pixel is decoded, so a decompression bomb costs nothing.
        min_side: refuse images with a side shorter than this (`too_small`).
        name: how to name the source in errors; by default its path.

    Reasons raised: `missing_file`, `empty_file`, `unreadable_image`, `truncated_image`, `too_large`, `too_small`,
    `missing_field`.
    """
    name = name or _describe(source)
    opened = _open_source(source, name)
    if isinstance(opened, Image.Image):
        _check_size(opened, name, max_pixels, min_side)
        return to_rgb(opened)
    with warnings.catch_warnings():
        # We apply our own pixel limit, so PIL's bomb warning would only repeat it; its other warnings (corrupt
        # EXIF and the like) would print once per sample per worker and bury the skip summary.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        return _decode_file(opened, name, max_pixels, min_side)


def _decode_file(opened: io.BytesIO | str, name: str, max_pixels: int, min_side: int) -> Image.Image:
    try:
        image = Image.open(opened)
    except Image.DecompressionBombError as error:
        raise BadSampleError(name, "too_large", str(error)) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise BadSampleError(name, "unreadable_image", str(error)) from error
    with image:
        _check_size(image, name, max_pixels, min_side)
        _decode_pixels(image, name)
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # broken EXIF is common and harmless: keep the stored orientation
            pass
        return to_rgb(image)


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 bytes to text, or `BadSampleError(source, "bad_text_encoding")`. A leading BOM is dropped."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadSampleError(source, "bad_text_encoding", str(error)) from error


def parse_json(raw: bytes | str, source: str) -> Any:
    """Parse JSON from bytes or text, or raise `BadSampleError` (`bad_text_encoding` or `malformed_json`)."""
    text = decode_text(raw, source) if isinstance(raw, bytes) else raw
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BadSampleError(source, "malformed_json", str(error)) from error
