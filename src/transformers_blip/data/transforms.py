"""Image transforms as BLIP trains and evaluates with them, written on PIL and torch (no torchvision).

Training: random resized crop (bicubic), horizontal flip, RandAugment with the original's ten operations
(`N=2, M=5`, each applied with probability 0.5), then a float tensor normalised with the CLIP statistics.
Evaluation: a bicubic resize to a square. The flip is the one augmentation that changes what text says about the
image, so the train transform can take the text along and swap "left" and "right" when it flips (or not flip).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from .decoding import to_rgb
from .text import any_mentions_sides, swap_sides, swap_sides_all

BLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# The operations BLIP's training transform samples from (no colour jitter: colour is in the captions).
BLIP_AUGMENTATIONS = (
    "Identity",
    "AutoContrast",
    "Brightness",
    "Sharpness",
    "Equalize",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
)
_MAX_MAGNITUDE = 10
_FILL = (128, 128, 128)
# The original translates by up to 10 pixels of a 384-pixel image; we keep the fraction, not the pixel count,
# so that small images are not thrown about.
_MAX_TRANSLATE_FRACTION = 10 / 384


def _signed(value: float, rng: random.Random) -> float:
    return value if rng.random() < 0.5 else -value


def _identity(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    return image


def _autocontrast(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    return ImageOps.equalize(image)


def _enhance_factor(magnitude: float) -> float:
    # The original maps M in [0, 10] to a factor in [0.1, 1.9]; at its M=5 the factor is exactly 1.
    return magnitude / _MAX_MAGNITUDE * 1.8 + 0.1


def _brightness(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(_enhance_factor(magnitude))


def _sharpness(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    return ImageEnhance.Sharpness(image).enhance(_enhance_factor(magnitude))


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    """Apply an affine map given as PIL's inverse coefficients (output pixel -> input pixel)."""
    return image.transform(
        image.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.BILINEAR, fillcolor=_FILL
    )


def _shear_x(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    shear = _signed(magnitude / _MAX_MAGNITUDE * 0.3, rng)
    # Shear about the centre row, so the image does not also slide sideways.
    return _affine(image, (1, shear, -shear * image.height / 2, 0, 1, 0))


def _shear_y(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    shear = _signed(magnitude / _MAX_MAGNITUDE * 0.3, rng)
    return _affine(image, (1, 0, 0, shear, 1, -shear * image.width / 2))


def _translate_x(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    offset = _signed(magnitude / _MAX_MAGNITUDE * _MAX_TRANSLATE_FRACTION * image.width, rng)
    return _affine(image, (1, 0, offset, 0, 1, 0))


def _translate_y(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    offset = _signed(magnitude / _MAX_MAGNITUDE * _MAX_TRANSLATE_FRACTION * image.height, rng)
    return _affine(image, (1, 0, 0, 0, 1, offset))


def _rotate(image: Image.Image, magnitude: float, rng: random.Random) -> Image.Image:
    angle = _signed(magnitude / _MAX_MAGNITUDE * 30, rng)
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)


_OPERATIONS: dict[str, Callable[[Image.Image, float, random.Random], Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}


class RandAugment:
    """RandAugment as BLIP uses it: draw `num_ops` operations (with replacement), apply each with probability 0.5.

    Args:
        num_ops: operations drawn per image (the original's N).
        magnitude: strength in [0, 10] (the original's M).
        augmentations: names of the operations to draw from.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 5, augmentations: Sequence[str] = BLIP_AUGMENTATIONS):
        unknown = set(augmentations) - set(_OPERATIONS)
        if unknown:
            raise ValueError(f"Unknown augmentations {sorted(unknown)}; choose from {sorted(_OPERATIONS)}")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.augmentations = tuple(augmentations)

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.num_ops):
            name = rng.choice(self.augmentations)
            if rng.random() < 0.5:
                image = _OPERATIONS[name](image, self.magnitude, rng)
        return image


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) box covering a random fraction `scale` of the area at a random aspect `ratio`.

    Ten tries at a box that fits, then the largest centred box whose aspect lies within `ratio`.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = rng.randint(0, width - crop_width)
            top = rng.randint(0, height - crop_height)
            return left, top, left + crop_width, top + crop_height
    aspect = width / height
    if aspect < ratio[0]:
        crop_width, crop_height = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        crop_width, crop_height = round(height * ratio[1]), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def to_normalized_tensor(
    image: Image.Image, mean: Sequence[float] = BLIP_IMAGE_MEAN, std: Sequence[float] = BLIP_IMAGE_STD
) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float tensor, scaled to [0, 1] then normalised per channel."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)  # (3, H, W)
    pixels = pixels.float().div_(255.0)
    mean_tensor = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_tensor = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub_(mean_tensor).div_(std_tensor)


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def mirror_pair(image0: Image.Image, image1: Image.Image, sentence: str) -> tuple[Image.Image, Image.Image, str]:
    """Mirror an NLVR2 pair as one picture: swap the images, flip each, swap "left"/"right" in the statement.

    The statement stays true whether its sides refer to the images ("the left image has...") or to places inside
    them ("a dog on the left"). The original only swaps the images, which is right for the first kind alone.
    """
    return hflip(image1), hflip(image0), swap_sides(sentence)


class _WorkerRandom:
    """A `random.Random` that reseeds itself in every DataLoader worker, so workers never repeat each other.

    Seeds come from `seed` (or torch's initial seed) and the worker's torch seed, which changes every epoch and is
    reproducible once torch is seeded in the main process.
    """

    def __init__(self, seed: int | None):
        self.seed = seed
        self._key: tuple | None = None
        self._generator = random.Random()

    def get(self) -> random.Random:
        worker = torch.utils.data.get_worker_info()
        key = ("worker", worker.seed) if worker is not None else ("main",)
        if key != self._key:
            base = self.seed if self.seed is not None else torch.initial_seed()
            self._generator = random.Random(f"{base}/{key}")
            self._key = key
        return self._generator


class BlipTrainTransform:
    """BLIP's training transform: random resized crop, horizontal flip, RandAugment, normalised tensor.

    `transform(image)` returns the transformed image. `transform.with_text(image, text)` also takes the image's
    text (a string or a list such as a question and its answers) and keeps it true: when the image is flipped,
    "left" and "right" are swapped (`flip_text="swap"`), or the image is not flipped if the text mentions a side
    (`flip_text="avoid"`). Use `with_text` whenever the text may mention sides; plain calls flip blindly, as the
    original does.

    Args:
        image_size: output side in pixels.
        scale: range of the crop's area as a fraction of the image (BLIP: `(0.5, 1.0)`).
        ratio: range of the crop's aspect ratio.
        allow_flip: flip horizontally with probability 0.5.
        flip_text: `"swap"` or `"avoid"`, see above.
        randaugment: apply RandAugment after the flip.
        num_ops, magnitude, augmentations: RandAugment settings (BLIP: 2, 5, `BLIP_AUGMENTATIONS`).
        mean, std: normalisation statistics (CLIP's, as BLIP uses).
        return_tensors: `"pt"` for a normalised (3, H, W) float tensor, `None` for a PIL image.
        seed: makes the random choices reproducible; each DataLoader worker derives its own stream from it.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        allow_flip: bool = True,
        flip_text: str = "swap",
        randaugment: bool = True,
        num_ops: int = 2,
        magnitude: float = 5,
        augmentations: Sequence[str] = BLIP_AUGMENTATIONS,
        mean: Sequence[float] = BLIP_IMAGE_MEAN,
        std: Sequence[float] = BLIP_IMAGE_STD,
        return_tensors: str | None = "pt",
        seed: int | None = None,
    ):
        if flip_text not in ("swap", "avoid"):
            raise ValueError(f"flip_text must be 'swap' or 'avoid', got {flip_text!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        self.image_size = image_size
        self.scale = scale
        self.ratio = ratio
        self.allow_flip = allow_flip
        self.flip_text = flip_text
        self.randaugment = RandAugment(num_ops, magnitude, augmentations) if randaugment else None
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.return_tensors = return_tensors
        self._random = _WorkerRandom(seed)

    def __call__(self, image: Image.Image) -> Image.Image | torch.Tensor:
        rng = self._random.get()
        return self._transform(image, flip=self.allow_flip and rng.random() < 0.5, rng=rng)

    def with_text(
        self, image: Image.Image, text: str | Sequence[str]
    ) -> tuple[Image.Image | torch.Tensor, str | list[str]]:
        """Transform the image and return it with its text, kept true under the flip."""
        rng = self._random.get()
        flip = self.allow_flip and rng.random() < 0.5
        if flip and any_mentions_sides(text):
            if self.flip_text == "avoid":
                flip = False
            else:
                text = swap_sides_all(text)
        return self._transform(image, flip=flip, rng=rng), text

    def _transform(self, image: Image.Image, flip: bool, rng: random.Random) -> Image.Image | torch.Tensor:
        image = to_rgb(image)  # the decoder's conversion, for images that did not come through it
        box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, rng)
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        if flip:
            image = hflip(image)
        if self.randaugment is not None:
            image = self.randaugment(image, rng)
        if self.return_tensors == "pt":
            return to_normalized_tensor(image, self.mean, self.std)
        return image


class BlipEvalTransform:
    """BLIP's evaluation transform: a bicubic resize to `image_size` x `image_size`, then a normalised tensor.

    Args:
        image_size: output side in pixels.
        mean, std: normalisation statistics.
        return_tensors: `"pt"` for a (3, H, W) float tensor, `None` for a PIL image.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = BLIP_IMAGE_MEAN,
        std: Sequence[float] = BLIP_IMAGE_STD,
        return_tensors: str | None = "pt",
    ):
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.return_tensors = return_tensors

    def __call__(self, image: Image.Image) -> Image.Image | torch.Tensor:
        image = to_rgb(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.return_tensors == "pt":
            return to_normalized_tensor(image, self.mean, self.std)
        return image
