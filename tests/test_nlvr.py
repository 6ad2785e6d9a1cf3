"""The NLVR2 head: its output equals the original's equations written out by hand; it saves and reloads, round-trips
through the original checkpoint layout, starts from a pretraining model as the original does, and trains."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config, random_image

from transformers_blip import BlipForVisualReasoning
from transformers_blip.convert.original import load_original_checkpoint, save_original_checkpoint
from transformers_blip.convert.pretraining import task_head_from_pretraining
from transformers_blip.modeling_pretraining import BlipForPreTraining

LOGGER = "transformers_blip.convert"


def make_model(**overrides) -> BlipForVisualReasoning:
    torch.manual_seed(0)
    config = make_config(**overrides)
    config.text_config.num_hidden_layers = 3  # layer 0 averages; layers 1 and 2 merge (nlvr_merge_from_layer=1)
    config.nlvr_merge_from_layer = 1
    return BlipForVisualReasoning(config).eval()


def make_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 2, 3, 32, 32, generator=generator)  # (B, left/right, 3, H, W)
    input_ids = torch.tensor([[101, 110, 111, 112, 113, 102], [101, 120, 121, 102, 0, 0]])  # the second one padded
    attention_mask = (input_ids != 0).long()
    return pixel_values, input_ids, attention_mask


def attend(attention, queries, keys_values, mask_keep=None):
    """Multi-head scaled dot-product attention with `attention`'s query/key/value layers, step by step."""
    heads = attention.num_heads
    q, k, v = attention.query(queries), attention.key(keys_values), attention.value(keys_values)
    q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, H, Lq, Lk)
    if mask_keep is not None:
        scores = scores.masked_fill(~mask_keep.bool()[:, None, None, :], float("-inf"))
    out = scores.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(queries.shape)


def reference_logits(model, pixel_values, input_ids, attention_mask):
    """BLIP's NLVR2 model as the original `nlvr_encoder.py` defines it, written with plain tensor operations."""
    left = model.vision_model(pixel_values[:, 0]).last_hidden_state  # the ViT is checked against transformers
    right = model.vision_model(pixel_values[:, 1]).last_hidden_state  # elsewhere; here only the text side matters
    text = model.text_encoder
    ids = input_ids.clone()
    ids[:, 0] = model.config.text_config.encoder_token_id
    positions = torch.arange(ids.shape[1])
    x = text.embeddings.word_embeddings(ids) + text.embeddings.position_embeddings(positions)
    x = text.embeddings.LayerNorm(x)
    for index, layer in enumerate(text.encoder.layer):
        self_out = layer.attention.output
        x = self_out.LayerNorm(self_out.dense(attend(layer.attention.self, x, x, attention_mask)) + x)
        cross = layer.crossattention
        from_left = cross.output.dense0(attend(cross.self0, x, left))
        from_right = cross.output.dense1(attend(cross.self1, x, right))
        if index >= model.config.nlvr_merge_from_layer:
            combined = cross.output.merge_layer(torch.cat([from_left, from_right], dim=-1))
        else:
            combined = (from_left + from_right) / 2
        x = cross.output.LayerNorm(combined + x)
        hidden = F.gelu(layer.intermediate.dense(x))
        x = layer.output.LayerNorm(layer.output.dense(hidden) + x)
    first, relu, last = model.cls_head
    return last(relu(first(x[:, 0]))), x


@torch.no_grad()
def test_logits_equal_the_equations_written_out():
    model = make_model()
    for linear in (model.cls_head[0], model.cls_head[2]):
        torch.nn.init.normal_(linear.weight, std=0.5)  # logits of order 1, so that 1e-5 means something
    pixel_values, input_ids, attention_mask = make_inputs()
    ours = model(input_ids, pixel_values, attention_mask=attention_mask)
    logits, states = reference_logits(model, pixel_values, input_ids, attention_mask)
    assert ours.logits.shape == (2, 2) and logits.abs().max() > 0.1
    torch.testing.assert_close(ours.logits, logits, rtol=0, atol=1e-5)
    real_tokens = attention_mask.bool()  # padded positions hold values no one reads
    torch.testing.assert_close(ours.multimodal_embeds[real_tokens], states[real_tokens], rtol=0, atol=1e-5)
    # The two images play different parts: swapping them changes what the text encoder computes.
    swapped = model(input_ids, pixel_values.flip(1), attention_mask=attention_mask).multimodal_embeds
    assert (swapped - ours.multimodal_embeds)[real_tokens].abs().max() > 1e-3


def test_structure_follows_the_original():
    model = make_model()
    layers = model.text_encoder.encoder.layer
    assert layers[0].crossattention.output.merge_layer is None
    assert all(layer.crossattention.output.merge_layer.in_features == 64 for layer in layers[1:])  # 2 x hidden 32
    assert not hasattr(layers[0].crossattention, "self")


def test_loss_and_clear_errors():
    model = make_model()
    pixel_values, input_ids, attention_mask = make_inputs()
    labels = torch.tensor([1, 0])
    output = model(input_ids, pixel_values, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))
    assert output.image_embeds.shape == (2, 2, 17, 32)  # (B, pair, 1 + 16 patches, width)
    with pytest.raises(ValueError, match="pixel_values must hold a pair"):
        model(input_ids, pixel_values[:, 0])
    with pytest.raises(ValueError, match="nlvr_merge_from_layer"):
        BlipForVisualReasoning(make_config(nlvr_merge_from_layer=5))


@torch.no_grad()
def test_save_and_reload(tmp_path):
    model = make_model()
    pixel_values, input_ids, attention_mask = make_inputs()
    model.save_pretrained(tmp_path)
    reloaded, info = BlipForVisualReasoning.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    assert reloaded.config.nlvr_merge_from_layer == 1
    assert torch.equal(
        reloaded(input_ids, pixel_values, attention_mask=attention_mask).logits,
        model(input_ids, pixel_values, attention_mask=attention_mask).logits,
    )


@torch.no_grad()
def test_original_layout_round_trip(tmp_path):
    model = make_model()
    pixel_values, input_ids, attention_mask = make_inputs()
    save_original_checkpoint(model, tmp_path / "nlvr.pth")
    # The head is recognised from the keys (the config is given: 32-wide test models hide their head count).
    loaded, report = load_original_checkpoint(tmp_path / "nlvr.pth", config=model.config)
    assert type(loaded) is BlipForVisualReasoning and report.variant == "nlvr"
    assert report.is_complete and report.defaulted == {} and report.dropped_unexpected == {}
    assert torch.equal(
        loaded(input_ids, pixel_values, attention_mask=attention_mask).logits,
        model(input_ids, pixel_values, attention_mask=attention_mask).logits,
    )


def test_from_pretraining_both_attentions_start_from_the_pretrained_one(caplog):
    torch.manual_seed(0)
    pretraining = BlipForPreTraining(make_config(queue_size=8))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        model, report = task_head_from_pretraining(BlipForVisualReasoning, pretraining, output_report=True)
    assert caplog.records == []  # nothing unexpected, nothing missing
    assert report.is_complete
    # make_config has 2 text layers, so layer 1 merges; the classifier is new too.
    assert set(report.defaulted) == {
        "cls_head.0.weight",
        "cls_head.0.bias",
        "cls_head.2.weight",
        "cls_head.2.bias",
        "text_encoder.encoder.layer.1.crossattention.output.merge_layer.weight",
        "text_encoder.encoder.layer.1.crossattention.output.merge_layer.bias",
    }
    for ours, pretrained in zip(model.text_encoder.encoder.layer, pretraining.text_encoder.encoder.layer):
        for name in ("query.weight", "key.weight", "value.bias"):
            pretrained_tensor = pretrained.crossattention.self.get_parameter(name)
            assert torch.equal(ours.crossattention.self0.get_parameter(name), pretrained_tensor)
            assert torch.equal(ours.crossattention.self1.get_parameter(name), pretrained_tensor)
        for copy in (ours.crossattention.output.dense0, ours.crossattention.output.dense1):
            assert torch.equal(copy.weight, pretrained.crossattention.output.dense.weight)
        assert torch.equal(
            ours.crossattention.output.LayerNorm.weight, pretrained.crossattention.output.LayerNorm.weight
        )
    # Independent copies from now on: fine-tuning one attention leaves the other as it was.
    assert model.text_encoder.encoder.layer[0].crossattention.self0.query.weight.data_ptr() != (
        model.text_encoder.encoder.layer[0].crossattention.self1.query.weight.data_ptr()
    )


def test_a_few_steps_fit_a_batch():
    model = make_model().train()
    pixel_values, input_ids, attention_mask = make_inputs()
    labels = torch.tensor([1, 0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(input_ids, pixel_values, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Both images' attentions learned.
    first_layer = model.text_encoder.encoder.layer[0].crossattention
    assert first_layer.self0.query.weight.grad.abs().sum() > 0
    assert first_layer.self1.query.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_inputs_from_the_processor(processor):
    # As docs/models.md shows: each side of the pair through the processor, stacked on dim 1.
    left_images, right_images = [random_image(0), random_image(1)], [random_image(2), random_image(3)]
    left = processor(images=left_images, text=["red circle left", "two blue square"], return_tensors="pt")
    right = processor(images=right_images, return_tensors="pt")
    pixel_values = torch.stack([left.pixel_values, right.pixel_values], dim=1)
    assert pixel_values.shape == (2, 2, 3, 32, 32)
    logits = make_model()(left.input_ids, pixel_values, attention_mask=left.attention_mask).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
