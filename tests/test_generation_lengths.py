"""The heads' default lengths give way to the caller's: `max_new_tokens` replaces the default `max_length`, and a
maximum below the default minimum lowers it, with no warning of a conflict the caller did not make."""

import contextlib
import logging
import warnings

import pytest
import torch
from conftest import make_config

from transformers_blip import BlipForConditionalGeneration


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return BlipForConditionalGeneration(make_config()).eval()


@pytest.mark.parametrize(
    ("settings", "shortest", "longest"),
    [
        ({}, 5, 20),  # BLIP's caption defaults, [DEC] included
        ({"max_new_tokens": 12, "min_new_tokens": 12}, 13, 13),
        ({"max_new_tokens": 3}, 4, 4),  # below the default minimum of 5: the minimum gives way to the maximum
        ({"max_length": 3}, 3, 3),
        ({"max_new_tokens": 30, "min_new_tokens": 30}, 31, 31),  # past the default max_length of 20
    ],
)
def test_lengths_follow_the_caller_without_warnings(captioner, pixel_values, settings, shortest, longest):
    with warnings.catch_warnings(), logged_by_transformers() as messages:
        warnings.simplefilter("error")
        generated = captioner.generate(pixel_values[:1], num_beams=1, **settings)
    assert shortest <= generated.shape[1] <= longest
    assert messages == []


def test_a_conflict_the_caller_makes_is_still_reported(captioner, pixel_values):
    with logged_by_transformers() as messages:
        captioner.generate(pixel_values[:1], num_beams=1, max_new_tokens=4, max_length=10)
    assert any("max_new_tokens" in message for message in messages)


@contextlib.contextmanager
def logged_by_transformers():
    """Warnings logged by transformers, whose logger does not propagate to the root logger that caplog reads."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger("transformers").removeHandler(handler)
