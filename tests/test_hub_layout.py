"""A checkpoint in the hub's `Salesforce/blip-*` layout (saved by transformers' own BLIP classes) generates with
BLIP's settings: `[SEP]` ends, beam search with 3 beams, 5 to 20 tokens, unless its `generation_config.json` says
otherwise."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import random_image

from transformers_blip import BlipForConditionalGeneration, BlipForQuestionAnswering
from transformers_blip.pipelines import BlipImageToTextPipeline

SEP = 102


def save_their_model(their_class: type, config, path) -> transformers.PreTrainedModel:
    """transformers' own head with random weights, saved by its own `save_pretrained`: the hub's layout."""
    torch.manual_seed(0)
    theirs = their_class(transformers.BlipConfig.from_dict(config.to_transformers_dict())).eval()
    theirs.save_pretrained(path)
    return theirs


@pytest.fixture
def hub_captioner(tmp_path, config):
    path = tmp_path / "hub_captioner"
    theirs = save_their_model(transformers.BlipForConditionalGeneration, config, path)
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2  # transformers' own id
    return theirs, path


@torch.no_grad()
def test_hub_layout_captioner_generates_with_blips_settings(hub_captioner, pixel_values, tmp_path):
    theirs, path = hub_captioner
    ours = BlipForConditionalGeneration.from_pretrained(path)
    settings = ours.generation_config
    assert (settings.eos_token_id, settings.bos_token_id, settings.pad_token_id) == (SEP, 126, 0)
    assert (settings.num_beams, settings.max_length, settings.min_length) == (3, 20, 5)

    # transformers' BLIP, told BLIP's settings (it always ends at [SEP]), captions the same.
    ids = ours.generate(pixel_values)
    expected = theirs.generate(pixel_values=pixel_values, num_beams=3, max_length=20, min_length=5)
    assert ids.tolist() == expected.tolist()
    assert ids.shape[1] >= 5
    for row in ids.tolist():  # each caption stops at its first [SEP], then pads
        if SEP in row:
            assert set(row[row.index(SEP) + 1 :]) <= {0}

    # Saving keeps the settings.
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
    assert (saved["eos_token_id"], saved["num_beams"], saved["max_length"], saved["min_length"]) == (SEP, 3, 20, 5)
    assert BlipForConditionalGeneration.from_pretrained(tmp_path / "ours").generation_config.num_beams == 3


@torch.no_grad()
def test_hub_layout_captioner_through_the_pipeline(hub_captioner, processor):
    theirs, path = hub_captioner
    model = BlipForConditionalGeneration.from_pretrained(path)
    # Built directly: transformers' `pipeline("image-to-text", model=<instance>)` fails while logging its redirect.
    captioner = BlipImageToTextPipeline(
        model=model, tokenizer=processor.tokenizer, image_processor=processor.image_processor, processor=processor
    )
    image = random_image(0)
    pixels = processor(images=image, return_tensors="pt").pixel_values
    their_ids = theirs.generate(pixel_values=pixels, num_beams=3, max_length=20, min_length=5)
    expected = processor.batch_decode(their_ids, skip_special_tokens=True)[0]
    assert captioner(image) == [{"generated_text": expected}]


def test_generation_config_json_of_the_checkpoint_wins(hub_captioner):
    """Settings that the checkpoint's generation_config.json states are kept; its token ids are translated."""
    _, path = hub_captioner
    stated = {"num_beams": 2, "max_length": 7, "eos_token_id": 2, "bos_token_id": 126, "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(stated))
    settings = BlipForConditionalGeneration.from_pretrained(path).generation_config
    assert (settings.num_beams, settings.max_length, settings.min_length, settings.eos_token_id) == (2, 7, 5, SEP)


def test_hub_layout_without_generation_config_gets_blips_settings(hub_captioner):
    _, path = hub_captioner
    (path / "generation_config.json").unlink()
    settings = BlipForConditionalGeneration.from_pretrained(path).generation_config
    assert (settings.num_beams, settings.max_length, settings.min_length, settings.eos_token_id) == (3, 20, 5, SEP)


def test_hub_layout_vqa_gets_blips_answer_settings(tmp_path, config):
    save_their_model(transformers.BlipForQuestionAnswering, config, tmp_path)
    settings = BlipForQuestionAnswering.from_pretrained(tmp_path).generation_config
    assert (settings.num_beams, settings.max_length, settings.min_length, settings.eos_token_id) == (3, 10, 1, SEP)


def test_an_explicit_generation_config_is_used_as_given(hub_captioner):
    _, path = hub_captioner
    given = transformers.GenerationConfig(num_beams=4, eos_token_id=SEP, max_length=9)
    settings = BlipForConditionalGeneration.from_pretrained(path, generation_config=given).generation_config
    assert (settings.num_beams, settings.max_length) == (4, 9)
