"""Train and eval transforms: shapes, normalisation, seeding, worker streams, and text kept true under flips."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from transformers_blip.data import (
    BLIP_AUGMENTATIONS,
    BLIP_IMAGE_MEAN,
    BLIP_IMAGE_STD,
    BlipEvalTransform,
    BlipTrainTransform,
    RandAugment,
    mirror_pair,
    to_normalized_tensor,
)
from transformers_blip.data.transforms import random_resized_crop_box


def red_square_on_the_left(size: int = 48) -> Image.Image:
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    pixels[size // 3 : 2 * size // 3, 2:14] = (220, 30, 30)
    return Image.fromarray(pixels)


def red_side(image) -> str:
    """Which half of the image holds the red pixels."""
    pixels = np.asarray(image, dtype=np.int32)
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90)
    columns = np.nonzero(red)[1]
    return "left" if columns.mean() < pixels.shape[1] / 2 else "right"


def test_train_transform_output_is_normalised_tensor():
    transform = BlipTrainTransform(32, seed=0)
    pixels = transform(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    # A white image stays white through crops and flips; brightness at M=5 is the identity, so (1 - mean) / std.
    expected = (1 - torch.tensor(BLIP_IMAGE_MEAN)) / torch.tensor(BLIP_IMAGE_STD)
    assert torch.allclose(pixels[:, 16, 16], expected, atol=0.05)


def test_train_transform_can_return_pil():
    image = BlipTrainTransform(24, return_tensors=None, seed=0)(Image.new("L", (30, 30)))
    assert isinstance(image, Image.Image) and image.size == (24, 24) and image.mode == "RGB"


def test_seed_makes_the_transform_reproducible():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    first = BlipTrainTransform(32, seed=7)(image)
    transform = BlipTrainTransform(32, seed=7)
    again = transform(image)
    different = BlipTrainTransform(32, seed=8)(image)
    assert torch.equal(first, again)
    assert not torch.equal(first, different)
    assert not torch.equal(again, transform(image))  # the stream moves on


class _Images(Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.transform(self.image)


def test_dataloader_workers_draw_different_augmentations():
    torch.manual_seed(0)
    loader = DataLoader(_Images(BlipTrainTransform(16, seed=3)), batch_size=1, num_workers=2)
    outputs = [batch[0] for batch in loader]
    # Sample 0 comes from worker 0, sample 1 from worker 1: a copied generator would make them equal.
    assert not torch.equal(outputs[0], outputs[1])


def test_with_text_swaps_sides_when_it_flips():
    seen = set()
    for seed in range(20):
        transform = BlipTrainTransform(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), randaugment=False, seed=seed)
        transform.return_tensors = None
        image, text = transform.with_text(red_square_on_the_left(), "a red square on the left")
        assert text == f"a red square on the {red_side(image)}"
        seen.add(text)
    assert len(seen) == 2  # both outcomes happened


def test_with_text_handles_a_question_and_its_answers():
    transform = BlipTrainTransform(48, scale=(1.0, 1.0), randaugment=False, return_tensors=None, seed=1)
    for _ in range(10):
        image, texts = transform.with_text(red_square_on_the_left(), ["where is the red square?", "left", "left"])
        assert texts[1:] == [red_side(image), red_side(image)]


def test_avoid_policy_never_flips_text_with_sides():
    transform = BlipTrainTransform(
        48, scale=(1.0, 1.0), randaugment=False, flip_text="avoid", return_tensors=None, seed=0
    )
    for _ in range(20):
        image, text = transform.with_text(red_square_on_the_left(), "a red square on the left")
        assert text == "a red square on the left" and red_side(image) == "left"


def test_no_flip_when_disabled():
    transform = BlipTrainTransform(48, scale=(1.0, 1.0), randaugment=False, allow_flip=False, return_tensors=None)
    assert all(red_side(transform(red_square_on_the_left())) == "left" for _ in range(20))


def test_mirror_pair_keeps_nlvr_statements_true():
    left, right = red_square_on_the_left(), Image.new("RGB", (48, 48), (128, 128, 128))
    new_left, new_right, sentence = mirror_pair(left, right, "the left image has a red square on the left")
    assert sentence == "the right image has a red square on the right"
    assert red_side(new_right) == "right" and not (np.asarray(new_left)[..., 0] > 180).any()


@pytest.mark.parametrize("name", BLIP_AUGMENTATIONS)
def test_every_augmentation_keeps_size_and_mode(name):
    augment = RandAugment(num_ops=1, magnitude=10, augmentations=[name])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    outputs = [augment(image, random.Random(seed)) for seed in range(6)]
    assert all(out.size == (32, 32) and out.mode == "RGB" for out in outputs)
    if name not in ("Identity",):
        assert any(not np.array_equal(np.asarray(out), np.asarray(image)) for out in outputs)


def test_unknown_augmentation_is_rejected():
    with pytest.raises(ValueError, match="Unknown augmentations"):
        RandAugment(augmentations=["Solarize!"])


def test_random_resized_crop_box_respects_scale_and_bounds():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(100, 60, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= left < right <= 100 and 0 <= top < bottom <= 60
        assert (right - left) * (bottom - top) >= 0.45 * 6000


def test_eval_transform_and_normalisation():
    pixels = BlipEvalTransform(20)(Image.new("RGB", (40, 30), (0, 0, 0)))
    assert pixels.shape == (3, 20, 20)
    expected = -torch.tensor(BLIP_IMAGE_MEAN) / torch.tensor(BLIP_IMAGE_STD)
    assert torch.allclose(pixels[:, 0, 0], expected)
    tensor = to_normalized_tensor(Image.new("RGB", (2, 2), (255, 0, 0)), mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(tensor[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
