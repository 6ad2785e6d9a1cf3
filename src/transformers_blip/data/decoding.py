"""Robust decoding: bytes or files to RGB images and to text, with every failure turned into a `BadSampleError`.

Nothing here touches PIL's global settings (`MAX_IMAGE_PIXELS`, `LOAD_TRUNCATED_IMAGES`); the original sets both
for the whole process, which lets truncated files through as half-grey images and bombs through as memory errors.
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

# The one decoder lives beside the image processor, whose saved copy must run without this package; training, the
# processor and the pipelines all decode through it.
from ..image_processing_blip import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageSource, decode_image, to_rgb
from .skips import BadSampleError

# Below this a side is a tracking pixel, a spacer or an icon, not a picture.
DEFAULT_MIN_SIDE = 8
# The image files every reader recognises (folders by suffix, webdataset members by extension), lower case, no dot.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    name: str | None = None,
) -> Image.Image:
    """Decode an image into an upright RGB PIL image, or raise `BadSampleError` naming the file and the reason.

    The decoding is `image_processing_blip.decode_image`'s, the processor's own, so training sees the pixels that
    inference does (the conversion of every mode is `to_rgb`'s, described in docs/processing.md).

    Args:
        source: a path, encoded bytes, a `datasets.Image` value (`{"bytes": ..., "path": ...}`) or a PIL image.
        max_pixels: refuse images with more pixels than this (`too_large`), checked from the header before any
            pixel is decoded, so a decompression bomb costs nothing.
        min_side: refuse images with a side shorter than this (`too_small`).
        name: how to name the source in errors; by default its path.

    Reasons raised: `missing_file`, `empty_file`, `unreadable_image`, `truncated_image`, `too_large`, `too_small`,
    `missing_field`.
    """
    try:
        return decode_image(source, max_pixels=max_pixels, min_side=min_side, name=name)
    except ImageDecodeError as error:
        raise BadSampleError(error.source, error.reason, error.detail) from error


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


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "IMAGE_EXTENSIONS",
    "decode_text",
    "load_image",
    "parse_json",
    "to_rgb",
]
