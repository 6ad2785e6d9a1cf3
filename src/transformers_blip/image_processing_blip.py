"""BLIP image processing: the one image decoder of the package, and the image processor built on it.

`decode_image` turns a file, encoded bytes or a PIL image into an upright 8-bit RGB image, refusing decompression
bombs from the header and naming the file in every error; `to_rgb` is its conversion of any PIL mode to RGB. Training
(`data.decoding.load_image`), the processor and the pipelines all decode through these two functions, so an image
gives the same pixels wherever it enters.

`BlipImageProcessorAnyMode` is transformers' PIL BLIP image processor (bicubic resize to the model's square image size,
rescaling by 1/255, normalisation with the CLIP mean and std) with PIL images decoded by `decode_image` first.

This file imports nothing from the package: saved processors carry it beside their settings, and it runs there with
`trust_remote_code=True` where the package is not installed.
"""

from __future__ import annotations

import io
import os
import urllib.request
import warnings
from typing import Any

import numpy as np
import PIL.Image
from PIL import ExifTags, ImageOps, UnidentifiedImageError
from transformers import BlipImageProcessorPil

# PIL's own warning threshold (about 0.27 GB of RGB). Far above any training resolution, far below a bomb.
DEFAULT_MAX_PIXELS = 89_478_485

# The value that maps to white for the modes whose pixels are not 8-bit. 32-bit integer images ("I") hold 16-bit
# data in practice (PIL widened 16-bit PNGs to "I" for years, and `convert("I")` of "I;16" still does); float images
# ("F") are taken to be in 0..1, the convention of float image data.
SIXTEEN_BIT_WHITE = 65535.0
FLOAT_WHITE = 1.0

# Modes with premultiplied alpha, which PIL does not treat as transparency when converting to RGB.
PREMULTIPLIED_MODES = {"RGBa": "RGBA", "La": "LA"}
ALPHA_MODES = ("RGBA", "LA", "PA")

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | dict | PIL.Image.Image


class ImageDecodeError(ValueError):
    """An image that cannot be decoded: `source` names the file (or "<bytes>"), `reason` says why in one word.

    `reason` is one of `missing_file`, `empty_file`, `unreadable_image`, `truncated_image`, `too_large`, `too_small`,
    `missing_field`; `detail` carries the underlying message, if any.
    """

    def __init__(self, source: str, reason: str, detail: str = ""):
        self.source = str(source)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{self.source}: {reason}" + (f" ({detail})" if detail else ""))


def _is_high_bit_depth(mode: str) -> bool:
    return mode.startswith("I;16") or mode in ("I", "F")


def _to_eight_bit_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """An "L" image from a 16-bit, 32-bit integer or float one, scaled by a fixed white point and clipped.

    The scale depends on the mode alone, never on the pixels, so that a dark frame stays dark and a crop of an image
    has the pixels of the whole.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        pixels = np.nan_to_num(pixels, nan=0.0)
        white = FLOAT_WHITE
    else:
        white = SIXTEEN_BIT_WHITE
    grey = np.clip(np.rint(pixels * (255.0 / white)), 0, 255).astype(np.uint8)
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":  # a 16-bit grey PNG's transparent value
        grey[np.asarray(image) == key] = 255
    return PIL.Image.fromarray(grey, mode="L")


def _on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """Lays a transparent image on a white page: the colour of fully transparent pixels is often junk."""
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts a PIL image of any mode to 8-bit RGB, the way a viewer shows it.

    - Transparency ("RGBA", "LA", "PA", premultiplied "RGBa" and "La", a transparent palette entry or key colour) is
      laid on white.
    - "I;16" (any byte order) and "I": 0..65535 maps linearly onto 0..255, values outside are clipped.
    - "F": 0..1 maps linearly onto 0..255, values outside are clipped, NaN is black.
    - Every other mode ("L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", ...) goes through PIL's conversion.

    PIL's own `convert("RGB")` clips 16-bit and float values to 0..255, which turns most 16-bit photographs white and
    float images black, and drops transparency, which shows the hidden colour of transparent pixels.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in PREMULTIPLIED_MODES:
        image = image.convert(PREMULTIPLIED_MODES[image.mode])
    if _is_high_bit_depth(image.mode):
        return _to_eight_bit_grey(image).convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return _on_white(image)
    return image.convert("RGB")


def _describe(source: Any) -> str:
    """A short name for an image source, for error messages: its path where it has one."""
    if isinstance(source, dict):
        return str(source.get("path") or "<bytes>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, PIL.Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    return os.fspath(source)


def _openable(source: Any, name: str) -> io.BytesIO | str | PIL.Image.Image:
    """Turns a source into something `PIL.Image.open` takes, catching missing and empty inputs first."""
    if isinstance(source, dict):
        # The layout of a `datasets.Image` value: {"bytes": ..., "path": ...}, bytes taking precedence.
        if source.get("bytes") is not None:
            return _openable(source["bytes"], name)
        if source.get("path"):
            return _openable(source["path"], name)
        raise ImageDecodeError(name, "missing_field", "image value has neither bytes nor path")
    if isinstance(source, PIL.Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(name, "empty_file")
        return io.BytesIO(bytes(source))
    if not isinstance(source, (str, os.PathLike)):
        raise ImageDecodeError(name, "unreadable_image", f"expected a path, bytes or a PIL image, got {type(source)}")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ImageDecodeError(name, "missing_file")
    if os.path.getsize(path) == 0:
        raise ImageDecodeError(name, "empty_file")
    return path


def _check_size(image: PIL.Image.Image, name: str, max_pixels: int, min_side: int) -> None:
    """Refuses absurd sizes from the header alone, before any pixel is decoded."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(name, "too_large", f"{width}x{height} pixels, limit {max_pixels}")
    if min(width, height) == 0:
        raise ImageDecodeError(name, "too_small", f"{width}x{height}: no pixels")
    if min(width, height) < min_side:
        raise ImageDecodeError(name, "too_small", f"{width}x{height} pixels, minimum side {min_side}")


def _load_pixels(image: PIL.Image.Image, name: str) -> None:
    """Forces PIL's lazy decode, classifying its errors."""
    try:
        image.load()
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, zlib errors...
        reason = "truncated_image" if "truncat" in str(error).lower() else "unreadable_image"
        raise ImageDecodeError(name, reason, str(error)) from error


def _upright(image: PIL.Image.Image) -> PIL.Image.Image:
    """Applies the EXIF orientation, as viewers do; broken EXIF is common and harmless, so it keeps the image."""
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _decode_opened(image: PIL.Image.Image, name: str, max_pixels: int, min_side: int) -> PIL.Image.Image:
    _check_size(image, name, max_pixels, min_side)
    _load_pixels(image, name)
    return to_rgb(_upright(image))


def _open_and_decode(opened: io.BytesIO | str, name: str, max_pixels: int, min_side: int) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(opened)
    except PIL.Image.DecompressionBombError as error:
        raise ImageDecodeError(name, "too_large", str(error)) from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageDecodeError(name, "unreadable_image", str(error)) from error
    with image:
        return _decode_opened(image, name, max_pixels, min_side)


def decode_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 1,
    name: str | None = None,
) -> PIL.Image.Image:
    """Decodes an image into an upright RGB PIL image (see [`to_rgb`]), or raises [`ImageDecodeError`].

    Args:
        source: a path, encoded bytes, a `datasets.Image` value (`{"bytes": ..., "path": ...}`) or a PIL image.
        max_pixels: refuse images with more pixels than this (`too_large`), checked from the header before any
            pixel is decoded, so a decompression bomb costs nothing.
        min_side: refuse images with a side shorter than this (`too_small`); an image without pixels always is.
        name: how to name the source in errors; by default its path.

    Nothing here touches PIL's global settings (`MAX_IMAGE_PIXELS`, `LOAD_TRUNCATED_IMAGES`), which would let
    truncated files through as half-grey images for the whole process.
    """
    name = name or _describe(source)
    opened = _openable(source, name)
    with warnings.catch_warnings():
        # We apply our own pixel limit, so PIL's bomb warning would only repeat it; its other warnings (corrupt
        # EXIF and the like) would print once per image and bury what matters.
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        if isinstance(opened, PIL.Image.Image):
            return _decode_opened(opened, name, max_pixels, min_side)
        return _open_and_decode(opened, name, max_pixels, min_side)


def _is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


class BlipImageProcessorAnyMode(BlipImageProcessorPil):
    r"""
    transformers' [`BlipImageProcessorPil`] (bicubic resize to `size`, rescale by 1/255, normalise with the CLIP mean
    and std) that decodes every PIL image with [`decode_image`]: any mode becomes a faithful RGB (see [`to_rgb`]),
    the EXIF orientation is applied, an image larger than `max_pixels` is refused before it is decoded, and a broken
    file raises an [`ImageDecodeError`] that names it. Paths, URLs and encoded bytes given as images are decoded the
    same way.
    NumPy arrays and torch tensors follow transformers' conventions (values in 0..255 unless `do_rescale=False`;
    channels first or last). An image with no pixels raises a `ValueError`.

    Example:

    ```python
    >>> image_processor = BlipImageProcessorAnyMode(size={"height": 384, "width": 384})
    >>> image_processor("scan.tif", return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 384, 384])
    ```
    """

    # Refuse images with more pixels than this; set it on an instance to change the limit.
    max_pixels = DEFAULT_MAX_PIXELS

    def load_image(self, source: ImageSource, timeout: float | None = None) -> PIL.Image.Image:
        """An upright RGB image from a path, an http(s) URL, encoded bytes or a PIL image, decoded by
        [`decode_image`] with this processor's `max_pixels`. `timeout` (seconds) applies to URLs."""
        if _is_url(source):
            try:
                with urllib.request.urlopen(source, timeout=timeout) as response:
                    encoded = response.read()
            except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
                raise ImageDecodeError(source, "missing_file", str(error)) from error
            return decode_image(encoded, max_pixels=self.max_pixels, name=source)
        return decode_image(source, max_pixels=self.max_pixels)

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Decodes images given as paths, URLs or encoded bytes with [`load_image`], in the structure they came in."""
        if isinstance(image_url_or_urls, (list, tuple)):
            return [self.fetch_images(item) for item in image_url_or_urls]
        if isinstance(image_url_or_urls, (str, os.PathLike, bytes, bytearray)):
            return self.load_image(image_url_or_urls)
        return super().fetch_images(image_url_or_urls)

    def process_image(self, image, *args, **kwargs) -> np.ndarray:
        if isinstance(image, PIL.Image.Image):
            image = decode_image(image, max_pixels=self.max_pixels)
        elif 0 in tuple(image.shape):
            raise ValueError(f"Cannot process an image with no pixels (got an image of shape {tuple(image.shape)}).")
        return super().process_image(image, *args, **kwargs)


# Saved image processors carry this file and an `auto_map`, for loading with `trust_remote_code=True`.
BlipImageProcessorAnyMode.register_for_auto_class()

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "BlipImageProcessorAnyMode",
    "ImageDecodeError",
    "decode_image",
    "to_rgb",
]
