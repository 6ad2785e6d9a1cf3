"""Gradient checkpointing of the ViT (every block, or only the last `gradient_checkpointing_layers`, as the original's
`vit_ckpt_layer`) and of the text model: the same gradients, and exactly the chosen blocks recomputed."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from transformers_blip import BlipVisionConfig, BlipVisionModel
from transformers_blip.modeling_pretraining import BlipForPreTraining

DEPTH = 4


def vision_model(**overrides) -> BlipVisionModel:
    torch.manual_seed(0)
    config = make_config().vision_config
    config.num_hidden_layers = DEPTH
    for name, value in overrides.items():
        setattr(config, name, value)
    return BlipVisionModel(config).train()


def count_calls(modules: list[torch.nn.Module]) -> list[int]:
    """A list that counts, from now on, how often each of `modules` runs. A forward pre-hook fires again when the
    backward pass replays a checkpointed layer, so a layer's first submodule counts 2 per step when recomputed."""
    calls = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    return calls


def calls_per_block(model: BlipVisionModel, pixel_values: torch.Tensor) -> list[int]:
    """How often each ViT block ran in one forward and backward: 2 for a recomputed block, 1 for the others."""
    calls = count_calls([layer.layer_norm1 for layer in model.encoder.layers])
    model(pixel_values).last_hidden_state.sum().backward()
    return calls


@pytest.mark.parametrize(
    ("checkpointed", "expected"),
    [(None, [2, 2, 2, 2]), (1, [1, 1, 1, 2]), (3, [1, 2, 2, 2]), (0, [1, 1, 1, 1]), (9, [2, 2, 2, 2])],
)
def test_exactly_the_last_n_vit_blocks_are_recomputed(pixel_values, checkpointed, expected):
    model = vision_model(gradient_checkpointing_layers=checkpointed)
    model.activation_checkpointing_enable()
    assert calls_per_block(model, pixel_values) == expected


def test_without_checkpointing_enabled_no_block_is_recomputed(pixel_values):
    model = vision_model(gradient_checkpointing_layers=2)
    assert calls_per_block(model, pixel_values) == [1, 1, 1, 1]
    model.activation_checkpointing_enable()
    model.activation_checkpointing_disable()
    assert calls_per_block(model, pixel_values) == [1, 1, 1, 1]


def test_a_count_set_on_the_config_of_a_built_model_takes_effect(pixel_values):
    model = vision_model()
    model.activation_checkpointing_enable()
    assert calls_per_block(model, pixel_values) == [2, 2, 2, 2]
    model.config.gradient_checkpointing_layers = 2  # what a fine-tuning script sets after loading
    assert calls_per_block(model, pixel_values) == [1, 1, 2, 2]
    # Evaluation and no-grad passes never checkpoint.
    with torch.no_grad():
        model(pixel_values)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "4"])
def test_a_bad_count_is_refused_naming_the_field(pixel_values, bad):
    with pytest.raises(ValueError, match="gradient_checkpointing_layers"):
        BlipVisionConfig(gradient_checkpointing_layers=bad)
    model = vision_model()
    model.activation_checkpointing_enable()
    model.config.gradient_checkpointing_layers = bad
    with pytest.raises(ValueError, match="gradient_checkpointing_layers"):
        model(pixel_values)


def pretraining_gradients(checkpointing: bool, batch: dict[str, torch.Tensor], **vision_overrides):
    """Gradients of every trainable tensor of the tiny pretraining model after one step, and how often each of its
    online ViT blocks and text layers ran."""
    config = make_config(queue_size=8)
    config.vision_config.num_hidden_layers = DEPTH
    config.vision_config.drop_path_rate = 0.3  # a recomputed block must redraw the very same stochastic depth
    for name, value in vision_overrides.items():
        setattr(config.vision_config, name, value)
    torch.manual_seed(0)
    model = BlipForPreTraining(config).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    # The first layer of the text encoder and of the decoder; every online ViT block.
    text_calls = count_calls(
        [model.text_encoder.encoder.layer[0].attention, model.text_decoder.bert.encoder.layer[0].attention]
    )
    vision_calls = count_calls([layer.layer_norm1 for layer in model.vision_model.encoder.layers])
    torch.manual_seed(1)  # the same hard negatives and drop-path draws in both runs
    model(**batch).loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return grads, vision_calls, text_calls


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(104, 126, (4, 8), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    return {
        "pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
    }


@pytest.mark.parametrize("checkpointed", [None, 2])
def test_pretraining_gradients_are_the_same_with_checkpointing(batch, checkpointed):
    plain, plain_vision_calls, plain_text_calls = pretraining_gradients(False, batch)
    checked, vision_calls, text_calls = pretraining_gradients(True, batch, gradient_checkpointing_layers=checkpointed)
    assert plain_vision_calls == [1] * DEPTH
    # The text encoder runs twice per step (unimodal ITC, then image-grounded ITM), the decoder once: each layer is
    # recomputed once per run.
    assert plain_text_calls == [2, 1] and text_calls == [4, 2]
    assert vision_calls == ([2] * DEPTH if checkpointed is None else [1, 1, 2, 2])
    assert plain.keys() == checked.keys() and len(plain) > 100
    for name, grad in plain.items():
        torch.testing.assert_close(checked[name], grad, rtol=0, atol=1e-6, msg=name)
