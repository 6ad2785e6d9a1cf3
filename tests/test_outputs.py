"""What the heads return and refuse: hidden states on request, attention weights and unknown arguments refused by
name, tuples with `return_dict=False`, output names as transformers' BLIP means them, one name per feature method."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import make_config
from transformers import Trainer, TrainingArguments

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipForVisualReasoning,
    BlipModel,
    BlipTextLMHeadModel,
    BlipTextModel,
    BlipVisionModel,
)
from transformers_blip.evaluation import itc_features
from transformers_blip.modeling_blip import itc_feature
from transformers_blip.modeling_pretraining import BlipForPreTraining

LAYERS = 2  # make_config's depth of both towers: hidden states are the embeddings plus one per layer


def head_inputs(head: type, pixel_values: torch.Tensor, text_ids: torch.Tensor) -> dict:
    """Keyword inputs that run `head`'s forward on the shared fixtures."""
    if head is BlipForVisualReasoning:
        return {"input_ids": text_ids[:2], "pixel_values": pixel_values[:2, None].expand(2, 2, 3, 32, 32)}
    if head is BlipForQuestionAnswering:
        return {"input_ids": text_ids, "pixel_values": pixel_values, "answer_input_ids": text_ids}
    return {"input_ids": text_ids, "pixel_values": pixel_values}


# Each head's hidden-state fields: (field, batch size, sequence length) of every tensor in it.
HIDDEN_STATE_FIELDS = {
    BlipForConditionalGeneration: {"vision_hidden_states": (3, 17), "decoder_hidden_states": (3, 7)},
    BlipForImageTextRetrieval: {
        "vision_hidden_states": (3, 17),
        "text_hidden_states": (3, 7),
        "multimodal_hidden_states": (3, 7),
    },
    BlipForQuestionAnswering: {
        "vision_hidden_states": (3, 17),
        "question_hidden_states": (3, 7),
        "answer_hidden_states": (3, 7),
    },
    BlipForVisualReasoning: {"vision_hidden_states": (2, 2), "multimodal_hidden_states": (2, 7)},
}


@pytest.mark.parametrize("head", list(HIDDEN_STATE_FIELDS), ids=lambda head: head.__name__)
@torch.no_grad()
def test_heads_return_hidden_states_on_request(config, pixel_values, text_ids, head):
    torch.manual_seed(0)
    model = head(config).eval()
    inputs = head_inputs(head, pixel_values, text_ids)
    plain = model(**inputs)
    output = model(**inputs, output_hidden_states=True)
    for field, (batch, length) in HIDDEN_STATE_FIELDS[head].items():
        assert getattr(plain, field) is None, field
        states = getattr(output, field)
        assert len(states) == LAYERS + 1, field
        assert all(s.shape[:2] == (batch, length) for s in states), field
    # The text model's last hidden state is the output the head computed from.
    if head is BlipForImageTextRetrieval:
        assert torch.equal(output.multimodal_hidden_states[-1], output.multimodal_embeds)
    if head is BlipForQuestionAnswering:
        assert torch.equal(output.question_hidden_states[-1], output.question_embeds)


@torch.no_grad()
def test_the_configs_output_flags_are_honoured(config, pixel_values, text_ids):
    """As in transformers: `config.output_hidden_states` is the default; `config.output_attentions` is refused too."""
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.config.output_hidden_states = True
    output = model(pixel_values, text_ids)
    assert len(output.vision_hidden_states) == len(output.decoder_hidden_states) == LAYERS + 1
    assert model(pixel_values, text_ids, output_hidden_states=False).decoder_hidden_states is None
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(pixel_values, text_ids)


@torch.no_grad()
def test_feature_model_returns_both_encoders_outputs(config, pixel_values, text_ids):
    torch.manual_seed(0)
    model = BlipModel(config).eval()
    output = model(text_ids, pixel_values, output_hidden_states=True)
    assert len(output.vision_model_output.hidden_states) == LAYERS + 1
    assert len(output.text_model_output.hidden_states) == LAYERS + 1
    # Names as transformers' BlipOutput: the encoders' outputs; the projected features are `*_feat`, not `*_embeds`.
    assert output.vision_model_output.last_hidden_state.shape == (3, 17, 32)
    assert torch.equal(output.image_feat, itc_feature(model.vision_proj, output.vision_model_output.last_hidden_state))
    assert torch.equal(output.text_feat, itc_feature(model.text_proj, output.text_model_output.last_hidden_state))
    assert "image_embeds" not in output and "text_embeds" not in output
    as_tuple = model(text_ids, pixel_values, return_dict=False)
    assert torch.equal(as_tuple[0], output.logits_per_image) and isinstance(as_tuple[-1], tuple)


@torch.no_grad()
def test_tuples_keep_the_field_order(config, pixel_values, text_ids):
    """`return_dict=False` gives the set fields in their documented order: the loss first where there is one."""
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    inputs = head_inputs(BlipForQuestionAnswering, pixel_values, text_ids)
    output = model(**inputs)
    assert list(output.keys()) == ["loss", "logits", "image_embeds", "question_embeds"]
    as_tuple = model(**inputs, return_dict=False)
    assert torch.equal(as_tuple[0], output.loss) and torch.equal(as_tuple[1], output.logits)


ALL_HEADS = [BlipModel, *HIDDEN_STATE_FIELDS]


@pytest.mark.parametrize("head", ALL_HEADS, ids=lambda head: head.__name__)
def test_heads_refuse_attention_weights_and_unknown_arguments(config, pixel_values, text_ids, head):
    model = head(config).eval()
    inputs = head_inputs(head, pixel_values, text_ids)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(**inputs, output_attentions=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'output_atentions'"):
        model(**inputs, output_atentions=True)
    # Trainer passes loss keywords (num_items_in_batch) only to a forward that takes **kwargs.
    assert not any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values()
    )


def test_text_models_refuse_attention_weights_and_unknown_arguments(config):
    ids = torch.tensor([[101, 110, 111, 102]])
    image = torch.randn(1, 17, 32)
    encoder, decoder = BlipTextModel(config.text_config).eval(), BlipTextLMHeadModel(config.text_config).eval()
    with pytest.raises(ValueError, match="output_attentions=True is not supported by BlipTextModel"):
        encoder(ids, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions=True is not supported by BlipTextLMHeadModel"):
        decoder(ids, encoder_hidden_states=image, output_attentions=True)
    with pytest.raises(TypeError, match="token_type_ids"):
        encoder(ids, token_type_ids=torch.zeros_like(ids))
    assert len(decoder(ids, encoder_hidden_states=image, output_hidden_states=True).hidden_states) == LAYERS + 1


def test_feature_model_takes_single_segment_token_types_only(config, pixel_values, text_ids):
    """pipeline('zero-shot-image-classification') passes the tokenizer's token_type_ids: zeros mean nothing here."""
    torch.manual_seed(0)
    model = BlipModel(config).eval()
    with torch.no_grad():
        plain = model(text_ids, pixel_values).logits_per_image
        typed = model(text_ids, pixel_values, token_type_ids=torch.zeros_like(text_ids)).logits_per_image
    assert torch.equal(plain, typed)
    with pytest.raises(ValueError, match="token_type_ids holds non-zero types"):
        model(text_ids, pixel_values, token_type_ids=torch.ones_like(text_ids))


def test_trainer_passes_no_loss_keywords_to_the_heads(tmp_path, config):
    model = BlipForConditionalGeneration(config)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    assert Trainer(model=model, args=args).model_accepts_loss_kwargs is False


@torch.no_grad()
def test_one_name_for_the_itc_features(config, pixel_values, text_ids):
    """`get_image_features` / `get_text_features` on both ITC heads; the retrieval head's old names warn."""
    torch.manual_seed(0)
    retrieval = BlipForImageTextRetrieval(config).eval()
    features = BlipModel(config).eval()
    features.load_state_dict(retrieval.state_dict(), strict=False)
    output = retrieval(text_ids, pixel_values)
    for model in (retrieval, features):
        assert torch.allclose(model.get_image_features(pixel_values), output.image_feat, atol=1e-6)
        assert torch.allclose(model.get_text_features(text_ids), output.text_feat, atol=1e-6)
    with pytest.warns(FutureWarning, match="text_features is deprecated.*get_text_features"):
        assert torch.equal(retrieval.text_features(text_ids), retrieval.get_text_features(text_ids))
    with pytest.warns(FutureWarning, match="image_features is deprecated"):
        assert torch.equal(retrieval.image_features(output.image_embeds), output.image_feat)


@torch.no_grad()
def test_batched_itc_features_of_every_itc_model(config, pixel_values, text_ids):
    """The retrieval evaluation reads the same features as the models' own methods, whatever its batch size."""
    config.queue_size = 8
    for head in (BlipModel, BlipForImageTextRetrieval, BlipForPreTraining):
        torch.manual_seed(0)
        model = head(config).eval()
        mask = torch.ones_like(text_ids)
        image_feat, text_feat = itc_features(model, pixel_values, text_ids, mask, batch_size=2)
        assert torch.allclose(image_feat, model.get_image_features(pixel_values), atol=1e-6)
        assert torch.allclose(text_feat, model.get_text_features(text_ids, mask), atol=1e-6)


def test_wide_vit_vqa_config_reloads_to_the_same_shapes(tmp_path):
    """The question encoder reads the ViT width, the answer decoder the text width; a saved config says which."""
    config = make_config()
    config.vision_config.hidden_size = 48
    config = type(config)(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict())
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config)
    assert model.text_decoder.config.encoder_hidden_size == 32
    model.save_pretrained(tmp_path)
    reloaded, info = BlipForQuestionAnswering.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    assert reloaded.config.text_config.encoder_hidden_size == 48
    assert reloaded.config.answer_decoder_config().encoder_hidden_size == 32
    for name, tensor in model.state_dict().items():
        assert reloaded.state_dict()[name].shape == tensor.shape, name


def test_vision_and_pretraining_models_refuse_what_they_cannot_do(config, pixel_values, text_ids):
    vision = BlipVisionModel(config.vision_config).eval()
    with pytest.raises(ValueError, match="output_attentions=True is not supported by BlipVisionModel"):
        vision(pixel_values, output_attentions=True)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        vision(pixel_values, interpolate_pos_encoding=True)
    assert (
        len(vision(pixel_values, output_hidden_states=True).hidden_states)
        == config.vision_config.num_hidden_layers + 1
    )
    pretraining = BlipForPreTraining(config)
    with pytest.raises(TypeError, match="unexpected keyword argument 'labels'"):
        pretraining(pixel_values=pixel_values, input_ids=text_ids, labels=text_ids)
