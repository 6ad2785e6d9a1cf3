"""BlipForPreTraining: parameter sharing, size, saving, momentum encoders, queues, alpha, and its three losses
checked against a direct computation of the formulas."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import make_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForPreTraining

from transformers_blip import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipVisionConfig,
)
from transformers_blip.convert.pretraining import task_head_from_pretraining
from transformers_blip.losses import sample_hard_negatives
from transformers_blip.modeling_pretraining import BlipForPreTraining, count_unique_parameters

# The original BLIP_Pretrain at ViT-B/16, 224 px (models/blip_pretrain.py), counted from its state dict
# (reference/original_keys/pretrain_base_224.txt): every tensor except the momentum copies, the queues and the
# position-id buffers, with the decoder's tensors that are tied to the encoder counted once. The paper's 252M.
ORIGINAL_BASE_224_PARAMETERS = 252_441_919


def make_model(**overrides) -> BlipForPreTraining:
    torch.manual_seed(0)
    return BlipForPreTraining(make_config(**overrides)).train()


def make_batch(batch_size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images and `[CLS] words [SEP]` texts of different lengths, padded to 9 tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 5, 7, 4, 6, 8])[:batch_size]
    input_ids = torch.randint(104, 126, (batch_size, 9), generator=generator)
    input_ids[:, 0] = 101
    input_ids[torch.arange(batch_size), lengths - 1] = 102
    attention_mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
    }


def perturb_online_encoders(model: BlipForPreTraining, scale: float = 0.05) -> None:
    """Moves the online encoders away from their momentum copies, so that the two give different features."""
    with torch.no_grad():
        for module in (model.vision_model, model.text_encoder, model.vision_proj, model.text_proj):
            for param in module.parameters():
                param.add_(scale * torch.randn_like(param))


# ---- Structure ---------------------------------------------------------------------------------------------------


def test_encoder_and_decoder_share_everything_but_self_attention():
    model = make_model()
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    assert decoder.embeddings.word_embeddings.weight is encoder.embeddings.word_embeddings.weight
    assert decoder.embeddings.LayerNorm.bias is encoder.embeddings.LayerNorm.bias
    for encoder_layer, decoder_layer in zip(encoder.encoder.layer, decoder.encoder.layer):
        for name in ("crossattention", "intermediate", "output"):
            encoder_params = list(getattr(encoder_layer, name).parameters())
            decoder_params = list(getattr(decoder_layer, name).parameters())
            assert all(a is b for a, b in zip(encoder_params, decoder_params))
        assert all(
            a is not b for a, b in zip(encoder_layer.attention.parameters(), decoder_layer.attention.parameters())
        )
    # The LM head is the decoder's own, its projection tied to the (shared) word embeddings.
    assert model.text_decoder.cls.predictions.decoder.weight is encoder.embeddings.word_embeddings.weight
    assert model.text_decoder.cls.predictions.transform.dense.weight is not None


def test_momentum_encoders_are_frozen_copies():
    model = make_model()
    for online, momentum in ((model.vision_model, model.vision_model_m), (model.text_proj, model.text_proj_m)):
        for (name, param), (name_m, param_m) in zip(online.named_parameters(), momentum.named_parameters()):
            assert name == name_m and param is not param_m and torch.equal(param, param_m)
            assert param.requires_grad and not param_m.requires_grad
    # The momentum text encoder runs unimodally only: it has no cross-attention to copy.
    assert not hasattr(model.text_encoder_m.encoder.layer[0], "crossattention")


def test_unique_parameter_count_of_the_base_model_is_the_original_one():
    base_224 = BlipConfig(vision_config=BlipVisionConfig(image_size=224))
    with torch.device("meta"):
        model = BlipForPreTraining(base_224)
    assert count_unique_parameters(model) == ORIGINAL_BASE_224_PARAMETERS
    # The sharing is real on the meta device too, and the momentum copies are extra.
    assert (
        model.text_decoder.bert.encoder.layer[11].output.dense.weight
        is model.text_encoder.encoder.layer[11].output.dense.weight
    )
    assert count_unique_parameters(model, include_momentum=True) > ORIGINAL_BASE_224_PARAMETERS + 190_000_000


# ---- Saving and loading ------------------------------------------------------------------------------------------


def test_save_and_reload_keeps_sharing_state_and_outputs(tmp_path):
    model = make_model(queue_size=8)
    perturb_online_encoders(model)
    model(**make_batch())  # fills part of the queue and moves the pointer
    model._momentum_update()
    model.save_pretrained(tmp_path)
    reloaded, info = BlipForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    decoder_layer, encoder_layer = reloaded.text_decoder.bert.encoder.layer[1], reloaded.text_encoder.encoder.layer[1]
    assert decoder_layer.crossattention.self.key.weight is encoder_layer.crossattention.self.key.weight
    assert decoder_layer.attention.self.key.weight is not encoder_layer.attention.self.key.weight
    assert not any(param.requires_grad for param in reloaded.vision_model_m.parameters())
    for name, tensor in model.state_dict().items():  # weights, momentum copies, queues, pointer
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert int(reloaded.queue_ptr) == 4
    assert isinstance(AutoModelForPreTraining.from_pretrained(tmp_path), BlipForPreTraining)

    batch = make_batch(seed=1)
    outputs = []
    for candidate in (model.eval(), reloaded.eval()):
        torch.manual_seed(3)  # the same hard negatives
        outputs.append(candidate(**batch))
    for name in ("loss", "loss_itc", "loss_itm", "loss_lm", "itm_logits"):
        torch.testing.assert_close(outputs[0][name], outputs[1][name], rtol=0, atol=0)


def test_momentum_and_queues_are_rebuilt_when_the_checkpoint_has_none(tmp_path):
    model = make_model(queue_size=8)
    perturb_online_encoders(model)  # now online != momentum
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    online_only = {name: tensor for name, tensor in weights.items() if "_m." not in name and "queue" not in name}
    save_file(online_only, tmp_path / "model.safetensors", metadata={"format": "pt"})

    reloaded = BlipForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(
        reloaded.vision_model_m.encoder.layers[0].mlp.fc1.weight, model.vision_model.encoder.layers[0].mlp.fc1.weight
    )
    assert torch.equal(reloaded.text_proj_m.weight, model.text_proj.weight)
    torch.testing.assert_close(reloaded.image_queue.norm(dim=0), torch.ones(8))
    assert int(reloaded.queue_ptr) == 0 and bool((reloaded.idx_queue == -100).all())


# ---- Momentum, queues, alpha -------------------------------------------------------------------------------------


def test_momentum_update_is_an_exponential_moving_average():
    model = make_model(momentum=0.9)
    before = model.text_proj_m.weight.clone()
    perturb_online_encoders(model)
    model._momentum_update()
    torch.testing.assert_close(model.text_proj_m.weight, 0.9 * before + 0.1 * model.text_proj.weight)
    assert not model.text_proj_m.weight.requires_grad


def test_queue_is_written_with_momentum_features_at_the_pointer_and_wraps():
    model = make_model(queue_size=6)
    first, second = make_batch(seed=0), make_batch(seed=1)
    model(**first)
    assert int(model.queue_ptr) == 4
    model(**second, image_ids=torch.tensor([10, 11, 12, 13]))
    assert int(model.queue_ptr) == 2  # 4 + 4 wraps around a queue of 6

    features_m = model._momentum_features(second["pixel_values"], second["input_ids"], second["attention_mask"])
    columns = [4, 5, 0, 1]
    torch.testing.assert_close(model.image_queue[:, columns], features_m[0].t())
    torch.testing.assert_close(model.text_queue[:, columns], features_m[1].t())
    assert model.idx_queue[0].tolist() == [12, 13, -100, -100, 10, 11]


def test_evaluation_leaves_the_queue_alone():
    model = make_model(queue_size=8).eval()
    queue = model.image_queue.clone()
    model(**make_batch())
    assert torch.equal(model.image_queue, queue) and int(model.queue_ptr) == 0


def test_alpha_ramps_up_over_the_warmup_steps():
    model = make_model(alpha=0.4, alpha_warmup_steps=10)
    assert model.distillation_alpha(0) == 0.0
    assert model.distillation_alpha(5) == pytest.approx(0.2)
    assert model.distillation_alpha(25) == pytest.approx(0.4)
    model.optimizer_steps = 5
    assert model(**make_batch()).alpha == pytest.approx(0.2)
    assert make_model(alpha=0.4).distillation_alpha(0) == 0.4  # no ramp by default


def test_temperature_is_clamped():
    model = make_model()
    with torch.no_grad():
        model.temp.fill_(5.0)
    model(**make_batch())
    assert model.temp.item() == pytest.approx(0.5)


# ---- Hard negatives ----------------------------------------------------------------------------------------------


def test_hard_negatives_avoid_positives_and_prefer_similar_candidates():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 8.0, 0.0, 0.0]]).repeat(2000, 1)
    positives = torch.zeros(2000, 4, dtype=torch.bool)
    positives[:, 0] = True
    drawn = sample_hard_negatives(logits, positives)
    assert not bool((drawn == 0).any())
    assert (drawn == 1).float().mean() > 0.99  # e^8 outweighs the others ~3000 to 1

    every_candidate_positive = torch.ones(3, 4, dtype=torch.bool)
    assert sample_hard_negatives(torch.zeros(3, 4), every_candidate_positive).shape == (3,)


def test_pairs_of_the_same_image_are_never_itm_negatives():
    model = make_model(queue_size=0)
    image_ids = torch.tensor([7, 7, 8, 9])
    for seed in range(5):
        torch.manual_seed(seed)
        output = model(**make_batch(), image_ids=image_ids)
        for index in range(4):
            assert image_ids[output.itm_negative_image_indices[index]] != image_ids[index]
            assert image_ids[output.itm_negative_text_indices[index]] != image_ids[index]


# ---- The three losses against the formulas ------------------------------------------------------------------------


def unit_rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor / tensor.norm(dim=-1, keepdim=True)


def soft_target_loss(query: torch.Tensor, keys: list[torch.Tensor], targets: list[float], temp: float) -> torch.Tensor:
    """- sum_k target_k * log softmax_k(query . key_k / temp), written out."""
    scores = torch.stack([torch.dot(query, key) / temp for key in keys])
    log_normaliser = torch.log(torch.exp(scores).sum())
    return -sum(target * (score - log_normaliser) for target, score in zip(targets, scores))


def softmax_list(scores: list[torch.Tensor]) -> list[float]:
    exps = [torch.exp(score).item() for score in scores]
    return [value / sum(exps) for value in exps]


def itm_logit(model, input_ids, image_embeds, length) -> torch.Tensor:
    """ITM logits of one pair, its text cut to its real tokens, `[ENC]` first."""
    ids = input_ids[:length].clone()
    ids[0] = model.config.text_config.encoder_token_id
    states = model.text_encoder(ids[None], mode="multimodal", encoder_hidden_states=image_embeds[None])
    return model.itm_head(states.last_hidden_state[0, 0])


@pytest.mark.parametrize("use_image_ids", [False, True])
def test_losses_equal_a_direct_computation_of_the_formulas(use_image_ids):
    alpha, queue_size, smoothing = 0.3, 5, 0.1
    model = make_model(queue_size=queue_size)
    perturb_online_encoders(model)
    with torch.no_grad():  # a queue of earlier features, one of them from image 11 (a positive of pairs 1 and 2)
        model.image_queue.copy_(F.normalize(torch.randn_like(model.image_queue), dim=0))
        model.text_queue.copy_(F.normalize(torch.randn_like(model.text_queue), dim=0))
        model.idx_queue[0] = torch.tensor([11, 50, 51, 52, 53])
    image_queue, text_queue, queue_ids = (
        model.image_queue.t().clone(),
        model.text_queue.t().clone(),
        model.idx_queue[0].tolist(),
    )
    batch = make_batch()
    image_ids = [10, 11, 11, 12] if use_image_ids else None
    torch.manual_seed(0)
    output = model(**batch, image_ids=torch.tensor(image_ids) if use_image_ids else None, alpha=alpha)

    lengths = batch["attention_mask"].sum(dim=1).tolist()
    with torch.no_grad():
        temp = model.temp.item()
        image_embeds = model.vision_model(batch["pixel_values"]).last_hidden_state
        image_feat = unit_rows(model.vision_proj(image_embeds[:, 0]))
        image_feat_m = unit_rows(
            model.vision_proj_m(model.vision_model_m(batch["pixel_values"]).last_hidden_state[:, 0])
        )
        text_feat, text_feat_m = [], []
        for i, length in enumerate(lengths):
            ids = batch["input_ids"][i : i + 1, :length]
            text_feat.append(unit_rows(model.text_proj(model.text_encoder(ids, mode="text").last_hidden_state[0, 0])))
            text_feat_m.append(
                unit_rows(model.text_proj_m(model.text_encoder_m(ids, mode="text").last_hidden_state[0, 0]))
            )

        # ITC: keys are this batch's momentum features, then the queue; targets mix the momentum softmax with the
        # ground truth (uniform over the keys of the same image).
        text_keys = text_feat_m + list(text_queue)
        image_keys = list(image_feat_m) + list(image_queue)
        key_ids = (image_ids if use_image_ids else list(range(4))) + (
            queue_ids if use_image_ids else [-1] * queue_size
        )
        losses_i2t, losses_t2i = [], []
        for i in range(4):
            own = image_ids[i] if use_image_ids else i
            truth = [1.0 if key_id == own else 0.0 for key_id in key_ids]
            truth = [value / sum(truth) for value in truth]
            momentum_i2t = softmax_list([torch.dot(image_feat_m[i], key) / temp for key in text_keys])
            momentum_t2i = softmax_list([torch.dot(text_feat_m[i], key) / temp for key in image_keys])
            targets_i2t = [alpha * m + (1 - alpha) * t for m, t in zip(momentum_i2t, truth)]
            targets_t2i = [alpha * m + (1 - alpha) * t for m, t in zip(momentum_t2i, truth)]
            losses_i2t.append(soft_target_loss(image_feat[i], text_keys, targets_i2t, temp))
            losses_t2i.append(soft_target_loss(text_feat[i], image_keys, targets_t2i, temp))
        expected_itc = (sum(losses_i2t) / 4 + sum(losses_t2i) / 4) / 2

        # ITM: each pair is matched, each (text, its negative image) and (its negative text, image) is not.
        pairs = []
        for i in range(4):
            pairs.append((i, i, 1))
            pairs.append((i, int(output.itm_negative_image_indices[i]), 0))
            pairs.append((int(output.itm_negative_text_indices[i]), i, 0))
        itm_losses = []
        for text_index, image_index, label in pairs:
            logits = itm_logit(model, batch["input_ids"][text_index], image_embeds[image_index], lengths[text_index])
            itm_losses.append(-torch.log_softmax(logits, dim=-1)[label])
        expected_itm = sum(itm_losses) / len(itm_losses)

        # LM: `[DEC]` then the caption; each real token after the first is predicted, with label smoothing.
        token_losses = []
        for i, length in enumerate(lengths):
            ids = batch["input_ids"][i, :length].clone()
            ids[0] = model.config.text_config.decoder_bos_token_id
            logits = model.text_decoder(ids[None], encoder_hidden_states=image_embeds[i : i + 1]).logits[0]
            log_probs = torch.log_softmax(logits, dim=-1)
            for position in range(length - 1):
                target = ids[position + 1]
                nll = -log_probs[position, target]
                uniform = -log_probs[position].mean()
                token_losses.append((1 - smoothing) * nll + smoothing * uniform)
        expected_lm = sum(token_losses) / len(token_losses)

    if use_image_ids:  # pairs 1 and 2 show the same image: neither may be the other's negative
        assert int(output.itm_negative_image_indices[1]) != 2 and int(output.itm_negative_text_indices[2]) != 1
    torch.testing.assert_close(output.loss_itc, expected_itc, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss_itm, expected_itm, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss_lm, expected_lm, rtol=0, atol=1e-5)
    torch.testing.assert_close(output.loss, expected_itc + expected_itm + expected_lm, rtol=0, atol=3e-5)


def test_every_loss_reaches_the_parameters_it_trains():
    model = make_model(queue_size=4)
    output = model(**make_batch())
    output.loss.backward()
    assert model.temp.grad is not None and model.itm_head.weight.grad.abs().sum() > 0
    assert model.text_decoder.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0  # LM only
    assert model.vision_proj.weight.grad.abs().sum() > 0
    assert all(param.grad is None for param in model.vision_model_m.parameters())


def test_gradient_checkpointing_gives_the_same_loss():
    model = make_model(queue_size=0)
    torch.manual_seed(0)
    plain = model(**make_batch()).loss
    model.activation_checkpointing_enable()
    assert model.vision_model.encoder.layers[0].gradient_checkpointing
    assert model.text_decoder.bert.encoder.layer[0].gradient_checkpointing
    torch.manual_seed(0)
    checkpointed = model(**make_batch())
    checkpointed.loss.backward()
    torch.testing.assert_close(checkpointed.loss, plain)
    assert model.vision_proj.weight.grad is not None


# ---- From pretraining to the task heads ---------------------------------------------------------------------------


@pytest.fixture
def pretrained_dir(tmp_path):
    model = make_model(queue_size=8)
    perturb_online_encoders(model)
    model.save_pretrained(tmp_path)
    return tmp_path, model.eval()


def test_captioning_head_gets_the_pretraining_decoder(pretrained_dir, caplog):
    path, pretraining = pretrained_dir
    with caplog.at_level(logging.WARNING, logger="transformers_blip"):
        captioner = task_head_from_pretraining(BlipForConditionalGeneration, path)
    assert caplog.records == []  # nothing missing, nothing dropped unexpectedly
    batch = make_batch()
    expected = pretraining._lm(
        pretraining.vision_model(batch["pixel_values"]).last_hidden_state, batch["input_ids"], batch["attention_mask"]
    )[1]
    logits = captioner(batch["pixel_values"], batch["input_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected)


def test_retrieval_head_keeps_encoders_projections_and_itm_head(pretrained_dir):
    path, pretraining = pretrained_dir
    retrieval, report = task_head_from_pretraining(BlipForImageTextRetrieval, path, output_report=True)
    assert report.variant == "pretraining" and report.is_complete and report.defaulted == {}
    for name in ("itm_head.weight", "vision_proj.bias", "text_proj.weight", "temp"):
        assert torch.equal(retrieval.get_parameter(name), pretraining.get_parameter(name))
    batch = make_batch()
    output = retrieval(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    image_feat = F.normalize(
        pretraining.vision_proj(pretraining.vision_model(batch["pixel_values"]).last_hidden_state[:, 0]), dim=-1
    )
    torch.testing.assert_close(output.image_feat, image_feat)


def test_vqa_head_initialises_its_answer_decoder_from_the_pretraining_decoder(pretrained_dir):
    path, pretraining = pretrained_dir
    vqa, report = task_head_from_pretraining(BlipForQuestionAnswering, path, output_report=True)
    assert report.is_complete and report.defaulted == {}
    decoder, source = vqa.text_decoder.bert.encoder.layer[1], pretraining.text_decoder.bert.encoder.layer[1]
    assert torch.equal(decoder.attention.self.query.weight, source.attention.self.query.weight)  # decoder's own
    assert torch.equal(decoder.crossattention.self.key.weight, source.crossattention.self.key.weight)  # shared
    assert torch.equal(
        vqa.text_encoder.encoder.layer[1].attention.self.query.weight,
        pretraining.text_encoder.encoder.layer[1].attention.self.query.weight,
    )
    # The answer decoder is a copy: it no longer shares with the question encoder.
    assert (
        decoder.crossattention.self.key.weight is not vqa.text_encoder.encoder.layer[1].crossattention.self.key.weight
    )


def test_task_head_resizes_positions_and_names_what_does_not_fit(pretrained_dir, caplog):
    path, pretraining = pretrained_dir
    larger = make_config(image_size=48)
    captioner, report = task_head_from_pretraining(
        BlipForConditionalGeneration, pretraining, larger, output_report=True
    )
    position_embedding = "vision_model.embeddings.position_embedding"
    assert captioner.vision_model.embeddings.position_embedding.shape == (1, 37, 32)
    assert report.resized == {position_embedding: ((1, 17, 32), (1, 37, 32))} and report.is_complete

    wider_vocab = make_config()
    wider_vocab.text_config.vocab_size = 130
    with caplog.at_level(logging.WARNING, logger="transformers_blip"):
        _, report = task_head_from_pretraining(
            BlipForConditionalGeneration, pretraining, wider_vocab, output_report=True
        )
    word_embeddings = "text_decoder.bert.embeddings.word_embeddings.weight"
    assert "(128, 32) in the checkpoint, (130, 32)" in report.dropped_unexpected[word_embeddings]
    assert word_embeddings in report.missing and not report.is_complete
    assert any("NOT loaded" in record.getMessage() for record in caplog.records)


def test_bf16_autocast_keeps_float32_queues():
    model = make_model(queue_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**make_batch())
    output.loss.backward()
    assert model.image_queue.dtype == torch.float32 and int(model.queue_ptr) == 4
    assert torch.isfinite(output.loss) and model.vision_proj.weight.grad is not None
