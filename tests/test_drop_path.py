"""Stochastic depth takes effect wherever it is set: the vision config, the composite config, `from_pretrained`,
the config of a built model and pretrain.py's `--drop_path_rate` (tested in test_pretraining_determinism.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config

from transformers_blip import BlipConfig, BlipForConditionalGeneration
from transformers_blip.training import parse_with_recipe


def stochastic_in_training(model, pixel_values: torch.Tensor) -> bool:
    """Whether two training-mode passes of the model's ViT over the same images differ (and two eval passes do
    not): stochastic depth is the ViT's only randomness in the tiny config."""
    vision = model.vision_model
    vision.eval()
    with torch.no_grad():
        assert torch.equal(vision(pixel_values).last_hidden_state, vision(pixel_values).last_hidden_state)
        vision.train()
        return not torch.equal(vision(pixel_values).last_hidden_state, vision(pixel_values).last_hidden_state)


def test_rates_rise_linearly_over_the_blocks_as_timm_spaces_them():
    config = make_config()
    config.vision_config.num_hidden_layers = 5
    model = BlipForConditionalGeneration(config)
    assert [layer.drop_path_rate for layer in model.vision_model.encoder.layers] == [0.0] * 5
    model.config.vision_config.drop_path_rate = 0.2
    rates = [layer.drop_path_rate for layer in model.vision_model.encoder.layers]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_the_composite_config_reaches_the_vit_and_saves_no_field_of_its_own(tmp_path):
    config = BlipConfig(drop_path_rate=0.1)
    assert config.vision_config.drop_path_rate == 0.1 and config.drop_path_rate == 0.1
    config.drop_path_rate = 0.2
    assert config.vision_config.drop_path_rate == 0.2
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "drop_path_rate" not in saved and saved["vision_config"]["drop_path_rate"] == 0.2
    assert BlipConfig.from_pretrained(tmp_path).vision_config.drop_path_rate == 0.2


def test_from_pretrained_with_drop_path_rate_makes_the_vit_stochastic(tmp_path, pixel_values):
    torch.manual_seed(0)
    BlipForConditionalGeneration(make_config()).save_pretrained(tmp_path)
    plain = BlipForConditionalGeneration.from_pretrained(tmp_path)
    assert not stochastic_in_training(plain, pixel_values)
    for kwargs in ({"drop_path_rate": 0.5}, {"vision_config": {"drop_path_rate": 0.5}}):
        model = BlipForConditionalGeneration.from_pretrained(tmp_path, **kwargs)
        assert model.config.vision_config.drop_path_rate == 0.5
        assert stochastic_in_training(model, pixel_values), kwargs


def test_a_rate_set_on_the_config_of_a_built_model_takes_effect(pixel_values):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(make_config())
    assert not stochastic_in_training(model, pixel_values)
    model.config.vision_config.drop_path_rate = 0.5
    assert stochastic_in_training(model, pixel_values)


def test_pretrain_large_preset_uses_the_originals_drop_path_and_the_command_line_wins(monkeypatch):
    from test_pretrain_recipe import load_script

    script = load_script(monkeypatch)

    def drop_path_rate(*arguments):  # a parser per parse: a preset becomes its parser's defaults
        model_args, *_ = parse_with_recipe(script.build_parser(), [*arguments, "--output_dir", "run"])
        return model_args.drop_path_rate

    assert drop_path_rate("--recipe", "pretrain_large") == 0.1
    assert drop_path_rate("--recipe", "pretrain_base") is None  # the size's own: 0 for ViT-B, as the original
    assert drop_path_rate("--recipe", "pretrain_large", "--drop_path_rate", "0.2") == 0.2


def test_the_momentum_vit_follows_the_online_rate_as_the_original_builds_it(pixel_values):
    from transformers_blip import BlipForPreTraining

    torch.manual_seed(0)
    model = BlipForPreTraining(make_config())
    momentum = model.vision_model_m
    model.config.vision_config.drop_path_rate = 0.3  # the original's ViT-L gives both ViTs a rate (0.1)
    assert [layer.drop_path_rate for layer in momentum.encoder.layers] == [
        layer.drop_path_rate for layer in model.vision_model.encoder.layers
    ]
    model.train()
    with torch.no_grad():
        assert not torch.equal(momentum(pixel_values).last_hidden_state, momentum(pixel_values).last_hidden_state)
