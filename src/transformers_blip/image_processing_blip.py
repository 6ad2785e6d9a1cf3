"""BLIP image processing: transformers' PIL BLIP image processor, extended to turn every PIL mode into a faithful RGB.

Resizing (bicubic, to the model's square image size), rescaling by 1/255 and normalisation with the CLIP mean and std
are transformers' own. What this class adds is the conversion of images whose pixels are not 8-bit: PIL converts
16-bit ("I;16"), 32-bit integer ("I") and float ("F") images to RGB by clipping every value to [0, 255], which turns
a 16-bit photograph white and a float image in [0, 1] black. They are scaled to 8 bits here instead.
"""

import numpy as np
import PIL.Image
from transformers import BlipImageProcessorPil

# Value ranges that map to black..white for the modes without a fixed bit depth, tried in order; the first range
# that holds every pixel wins, and an image that fits none is stretched from its own minimum to its maximum.
INTEGER_RANGES = ((0.0, 255.0), (0.0, 65535.0))  # "I": 8-bit data widened to 32 bits, or 16-bit data
FLOAT_RANGES = ((0.0, 1.0), (0.0, 255.0))  # "F": unit floats, or 8-bit data as floats

# Modes with premultiplied alpha, which PIL does not treat as transparency when converting to RGB.
PREMULTIPLIED_MODES = {"RGBa": "RGBA", "La": "LA"}


def _grey_range(pixels: np.ndarray, candidate_ranges: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """(black, white) for `pixels`: the first candidate range that holds them all, else their min and max."""
    lowest, highest = float(pixels.min()), float(pixels.max())
    for black, white in candidate_ranges:
        if black <= lowest and highest <= white:
            return black, white
    return lowest, highest


def to_eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """Returns an 8-bit version of a high-bit-depth PIL image, or the image itself when it already has 8-bit bands.

    - "I;16" (and its byte orders "I;16B", "I;16L", "I;16N"): 0..65535 is mapped linearly onto 0..255.
    - "I": values within 0..255 are kept, values within 0..65535 are treated as 16-bit, anything else is stretched
      from the image's minimum to its maximum.
    - "F": values within 0..1 are scaled by 255, values within 0..255 are kept, anything else is stretched. NaN and
      infinite values become 0.
    Premultiplied "RGBa" and "La" become "RGBA" and "LA" so that their transparency is handled like any other.
    The result of a high-bit-depth image is grey ("L"), as these modes have a single band.
    """
    if image.mode in PREMULTIPLIED_MODES:
        return image.convert(PREMULTIPLIED_MODES[image.mode])
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image, dtype=np.float64)
        black, white = 0.0, 65535.0
    elif image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        pixels[~np.isfinite(pixels)] = 0.0
        black, white = _grey_range(pixels, INTEGER_RANGES if image.mode == "I" else FLOAT_RANGES)
    else:
        return image
    if white > black:
        grey = (pixels - black) * (255.0 / (white - black))
    else:  # a constant image outside every standard range: nothing to stretch
        grey = np.zeros_like(pixels)
    return PIL.Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))


class BlipImageProcessorAnyMode(BlipImageProcessorPil):
    r"""
    transformers' [`BlipImageProcessorPil`] (bicubic resize to `size`, rescale by 1/255, normalise with the CLIP mean
    and std, convert to RGB) that accepts a PIL image of any mode and any non-empty size.

    Conversion to RGB: transparent images ("RGBA", "LA", "PA", "P" with a transparent colour, premultiplied
    "RGBa"/"La") are composited onto a white background, as transformers does; "L", "1", "P", "CMYK", "YCbCr", "LAB"
    and "HSV" go through PIL's own conversion; 16-bit, 32-bit integer and float images are first scaled to 8 bits by
    [`to_eight_bit`] instead of being clipped. NumPy arrays and torch tensors follow transformers' conventions
    (values in 0..255 unless `do_rescale=False`; channels first or last). An image with no pixels raises a
    `ValueError`.

    Example:

    ```python
    >>> image_processor = BlipImageProcessorAnyMode(size={"height": 384, "width": 384})
    >>> image_processor(PIL.Image.open("scan.tif"), return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 384, 384])
    ```
    """

    def process_image(self, image, *args, **kwargs) -> np.ndarray:
        shape = (image.height, image.width) if isinstance(image, PIL.Image.Image) else tuple(image.shape)
        if 0 in shape:
            raise ValueError(f"Cannot process an image with no pixels (got an image of shape {shape}).")
        return super().process_image(image, *args, **kwargs)

    def convert_to_rgb(self, image, input_data_format=None) -> np.ndarray:
        if isinstance(image, PIL.Image.Image):
            image = to_eight_bit(image)
        return super().convert_to_rgb(image, input_data_format=input_data_format)


# Saved image processors carry this file and an `auto_map`, for loading with `trust_remote_code=True`.
BlipImageProcessorAnyMode.register_for_auto_class()

__all__ = ["BlipImageProcessorAnyMode", "to_eight_bit"]
