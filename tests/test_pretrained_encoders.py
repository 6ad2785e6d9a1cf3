"""Starting BLIP from pretrained encoders: tiny checkpoints that transformers' own ViTModel, DeiT and BertForMaskedLM
save, and a timm-layout state dict written here, land where they should; the rest is reported as new."""

import pytest
import torch
from conftest import make_config, tiny_vocab
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    BertTokenizerFast,
    DeiTConfig,
    DeiTForImageClassificationWithTeacher,
    ViTConfig,
    ViTModel,
)

from transformers_blip.convert.pretrained_encoders import (
    PretrainedSourceError,
    blip_tokenizer_for,
    load_pretrained_encoders,
)
from transformers_blip.modeling_pretraining import MOMENTUM_PAIRS, BlipForPreTraining
from transformers_blip.modeling_vision import interpolate_position_embedding

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, patch_size=8)


def blip(image_size=32) -> BlipForPreTraining:
    torch.manual_seed(0)
    return BlipForPreTraining(make_config(image_size=image_size))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("vit")
    # BLIP's ViT uses LayerNorm eps 1e-6 (the original's); with it, outputs can be compared exactly.
    ViTModel(ViTConfig(image_size=32, layer_norm_eps=1e-6, **VIT), add_pooling_layer=False).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(2)
    directory = tmp_path_factory.mktemp("bert")
    config = BertConfig(
        vocab_size=126, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = BertForMaskedLM(config)
    with torch.no_grad():  # BLIP has no token types: with a zero type embedding, BERT's outputs are comparable
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    bert.save_pretrained(directory)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(tiny_vocab()[:126])}).save_pretrained(directory)
    return directory


def test_vit_in_transformers_layout_lands_where_it_should(vit_dir):
    model = blip()
    report = load_pretrained_encoders(model, vision=vit_dir)
    vit = ViTModel.from_pretrained(vit_dir).eval()
    ours = model.vision_model.encoder.layers[1]
    theirs = vit.state_dict()
    q, k, v = (theirs[f"layers.1.attention.{name}_proj.weight"] for name in "qkv")
    assert torch.equal(ours.self_attn.qkv.weight, torch.cat([q, k, v]))
    assert torch.equal(ours.mlp.fc1.weight, theirs["layers.1.mlp.fc1.weight"])
    assert torch.equal(model.vision_model.embeddings.class_embedding, theirs["embeddings.cls_token"])
    # Whole-model check: the same image gives the same hidden states.
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vit(pixels).last_hidden_state
        got = model.vision_model(pixels).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not report.missing and not report.dropped_unexpected
    assert report.defaulted["vision_proj.weight"].startswith("new")
    # The momentum ViT starts equal to the online one.
    for online, momentum in MOMENTUM_PAIRS:
        for name, param_m in getattr(model, momentum).named_parameters():
            assert torch.equal(getattr(model, online).get_parameter(name), param_m), f"{momentum}.{name}"


def test_position_embeddings_are_resized_to_the_training_size(vit_dir):
    model = blip(image_size=48)  # the checkpoint is 32 px: a 4x4 grid, ours 6x6
    report = load_pretrained_encoders(model, vision=vit_dir)
    source = ViTModel.from_pretrained(vit_dir).embeddings.position_embeddings
    assert report.resized["vision_model.embeddings.position_embedding"] == ((1, 17, 32), (1, 37, 32))
    expected = interpolate_position_embedding(source.detach(), 6, 6)
    assert torch.equal(model.vision_model.embeddings.position_embedding, expected)


def test_deit_distillation_token_and_heads_are_dropped_and_reported(tmp_path):
    torch.manual_seed(3)
    deit = DeiTForImageClassificationWithTeacher(DeiTConfig(image_size=32, layer_norm_eps=1e-6, **VIT))
    deit.save_pretrained(tmp_path)
    model = blip()
    report = load_pretrained_encoders(model, vision=tmp_path)
    position = deit.deit.embeddings.position_embeddings  # (1, 2 + 16, D): [class, distillation, patches]
    expected = torch.cat([position[:, :1], position[:, 2:]], dim=1)
    assert torch.equal(model.vision_model.embeddings.position_embedding, expected)
    dropped = " ".join(report.dropped_expected)
    assert "dist_token" in dropped and "pos_embed[1]" in dropped
    assert "cls_classifier" in dropped and "distillation_classifier" in dropped
    assert not report.missing and not report.dropped_unexpected


def test_timm_layout_state_dict(tmp_path):
    generator = torch.Generator().manual_seed(4)
    shapes = {
        "cls_token": (1, 1, 32), "pos_embed": (1, 17, 32), "patch_embed.proj.weight": (32, 3, 8, 8),
        "patch_embed.proj.bias": (32,), "norm.weight": (32,), "norm.bias": (32,), "head.weight": (10, 32),
        "head.bias": (10,),
    }  # fmt: skip
    for n in range(2):
        shapes |= {
            f"blocks.{n}.norm1.weight": (32,), f"blocks.{n}.norm1.bias": (32,),
            f"blocks.{n}.norm2.weight": (32,), f"blocks.{n}.norm2.bias": (32,),
            f"blocks.{n}.attn.qkv.weight": (96, 32), f"blocks.{n}.attn.qkv.bias": (96,),
            f"blocks.{n}.attn.proj.weight": (32, 32), f"blocks.{n}.attn.proj.bias": (32,),
            f"blocks.{n}.mlp.fc1.weight": (37, 32), f"blocks.{n}.mlp.fc1.bias": (37,),
            f"blocks.{n}.mlp.fc2.weight": (32, 37), f"blocks.{n}.mlp.fc2.bias": (32,),
        }  # fmt: skip
    state_dict = {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    save_file(state_dict, tmp_path / "vit_tiny.safetensors")
    model = blip()
    report = load_pretrained_encoders(model, vision=tmp_path / "vit_tiny.safetensors")
    ours = model.vision_model
    assert torch.equal(ours.encoder.layers[1].self_attn.qkv.bias, state_dict["blocks.1.attn.qkv.bias"])
    assert torch.equal(ours.encoder.layers[0].self_attn.projection.weight, state_dict["blocks.0.attn.proj.weight"])
    assert torch.equal(ours.post_layernorm.weight, state_dict["norm.weight"])
    assert torch.equal(ours.embeddings.patch_embedding.weight, state_dict["patch_embed.proj.weight"])
    assert any("head.weight" in key for key in report.dropped_expected)
    assert sum(key.startswith("vision_model.") for key in report.loaded) == len(shapes) - 2


def test_bert_fills_the_encoder_the_decoder_and_the_lm_head(bert_dir):
    model = blip()
    initial_rows = model.text_encoder.embeddings.word_embeddings.weight[126:].clone()
    report = load_pretrained_encoders(model, text=bert_dir)
    bert = BertForMaskedLM.from_pretrained(bert_dir)
    theirs = bert.state_dict()
    encoder, decoder = model.text_encoder, model.text_decoder
    words = encoder.embeddings.word_embeddings.weight
    assert torch.equal(words[:126], theirs["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(words[126:], initial_rows)  # [DEC] and [ENC] keep their initialisation
    assert report.resized["text_encoder.embeddings.word_embeddings.weight"] == ((126, 32), (128, 32))
    bert_query = theirs["bert.encoder.layer.1.attention.self.query.weight"]
    assert torch.equal(encoder.encoder.layer[1].attention.self.query.weight, bert_query)
    # The decoder's self-attention is BERT's too, but a parameter of its own (the one thing it does not share).
    decoder_query = decoder.bert.encoder.layer[1].attention.self.query.weight
    assert torch.equal(decoder_query, bert_query)
    assert decoder_query.data_ptr() != encoder.encoder.layer[1].attention.self.query.weight.data_ptr()
    lm = decoder.cls.predictions
    assert torch.equal(lm.transform.dense.weight, theirs["cls.predictions.transform.dense.weight"])
    assert torch.equal(lm.bias[:126], theirs["cls.predictions.bias"])
    assert any("token_type" in key for key in report.dropped_expected)
    cross = "text_encoder.encoder.layer.0.crossattention.self.key.weight"
    assert report.defaulted[cross].startswith("new: the cross-attention")
    assert not report.missing and not report.dropped_unexpected
    # The unimodal text encoder computes what BERT computes.
    ids = torch.tensor([[101, 110, 111, 112, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = BertModel.from_pretrained(bert_dir)(ids, attention_mask=mask).last_hidden_state
        got = encoder(ids, attention_mask=mask, mode="text").last_hidden_state
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)


def test_tokenizer_from_the_text_source_adds_dec_and_enc(bert_dir):
    tokenizer = blip_tokenizer_for(bert_dir)
    assert len(tokenizer) == 128
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [126, 127]


def test_sources_of_no_known_layout_are_named(tmp_path, bert_dir, vit_dir):
    with pytest.raises(PretrainedSourceError, match="not a ViT"):
        load_pretrained_encoders(blip(), vision=bert_dir)
    with pytest.raises(PretrainedSourceError, match="not a BERT"):
        load_pretrained_encoders(blip(), text=vit_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedSourceError, match="no weights file"):
        load_pretrained_encoders(blip(), vision=tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(PretrainedSourceError, match="bad.safetensors"):
        load_pretrained_encoders(blip(), vision=tmp_path / "bad.safetensors")
