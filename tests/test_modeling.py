"""Behaviour of our own classes beyond parity: modes, errors, caches, losses, ranking, dtypes, checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipModel,
    BlipTextModel,
    BlipVisionModel,
)
from transformers_blip.modeling_blip import replace_first_token


def test_default_config_is_blip_base():
    from transformers_blip import BlipConfig

    config = BlipConfig()
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (768, 12)
    assert config.vision_config.layer_norm_eps == 1e-6
    assert config.text_config.vocab_size == 30524
    assert (config.text_config.decoder_bos_token_id, config.text_config.encoder_token_id) == (30522, 30523)
    assert config.text_config.encoder_hidden_size == 768
    assert config.text_config.label_smoothing == 0.1
    with torch.device("meta"):
        model = BlipForConditionalGeneration(config)
    # ViT-B/16 at 384px (86.2M + the 577 positions) and the BERT-base decoder with cross-attention (tied LM head).
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(224.0e6, rel=0.01)


def test_text_modes_are_validated(config):
    model = BlipTextModel(config.text_config).eval()
    ids = torch.tensor([[101, 110, 111, 102]])
    image = torch.randn(1, 17, 32)
    with pytest.raises(ValueError, match="mode must be one of"):
        model(ids, mode="decode")
    with pytest.raises(ValueError, match='mode="text"'):
        model(ids, mode="text", encoder_hidden_states=image)
    with pytest.raises(ValueError, match="cross-attends"):
        model(ids, mode="multimodal")
    too_long = torch.full((1, 65), 110)
    with pytest.raises(ValueError, match="65 tokens.*64 position embeddings"):
        model(too_long)


def test_modes_differ_where_they_should(config):
    """Text mode ignores the image; multimodal is bidirectional; decoder is causal (a later token changes nothing)."""
    torch.manual_seed(0)
    model = BlipTextModel(config.text_config).eval()
    ids = torch.tensor([[101, 110, 111, 112, 102]])
    changed = ids.clone()
    changed[0, 3] = 120
    image = torch.randn(1, 17, 32)
    with torch.no_grad():
        text = model(ids, mode="text").last_hidden_state
        grounded = model(ids, mode="multimodal", encoder_hidden_states=image).last_hidden_state
        grounded_other = model(ids, mode="multimodal", encoder_hidden_states=torch.randn(1, 17, 32)).last_hidden_state
        bidirectional_changed = model(changed, mode="multimodal", encoder_hidden_states=image).last_hidden_state
        decoder = model(ids, mode="decoder", encoder_hidden_states=image).last_hidden_state
        decoder_changed = model(changed, mode="decoder", encoder_hidden_states=image).last_hidden_state
    assert not torch.allclose(text, grounded)
    assert not torch.allclose(grounded, grounded_other)
    assert not torch.allclose(grounded[0, :3], bidirectional_changed[0, :3])  # earlier tokens see the later one
    assert torch.allclose(decoder[0, :3], decoder_changed[0, :3], atol=1e-6)  # ...but not in the decoder
    assert not torch.allclose(decoder[0, 3:], decoder_changed[0, 3:])


def test_mismatched_image_and_text_counts_raise(config, pixel_values, text_ids):
    for head in (BlipForImageTextRetrieval, BlipForConditionalGeneration, BlipModel):
        model = head(config).eval()
        with pytest.raises(ValueError, match="3 images.*2 texts"):
            if head is BlipModel:
                model.get_multimodal_features(text_ids[:2], pixel_values)
            elif head is BlipForConditionalGeneration:
                model(pixel_values, text_ids[:2])
            else:
                model(text_ids[:2], pixel_values)
    with pytest.raises(ValueError, match="pixel_values"):
        BlipVisionModel(config.vision_config)(torch.randn(3, 32, 32))


def test_position_embeddings_interpolate_like_transformers(config):
    """A 48px image on a 32px model: our automatic resize equals transformers' `interpolate_pos_encoding=True`."""
    torch.manual_seed(0)
    ours = BlipVisionModel(config.vision_config).eval()
    theirs = transformers.BlipVisionModel(
        transformers.BlipConfig.from_dict(config.to_transformers_dict()).vision_config
    ).eval()
    theirs.load_state_dict(ours.state_dict())
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        our_states = ours(pixels).last_hidden_state
        their_states = theirs(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert our_states.shape == (2, 1 + 36, 32)
    assert (our_states - their_states).abs().max() <= 1e-5


@torch.no_grad()
def test_cached_generation_equals_recomputation(config, pixel_values):
    """The KV cache and the once-per-image cross-attention keys change nothing: greedy with and without cache agree."""
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    settings = dict(num_beams=1, max_length=12, min_length=12)
    assert (
        model.generate(pixel_values, use_cache=True, **settings).tolist()
        == model.generate(pixel_values, use_cache=False, **settings).tolist()
    )


@torch.no_grad()
def test_padded_prompts_are_refused(config, pixel_values, tokenizer):
    model = BlipForConditionalGeneration(config).eval()
    prompts = tokenizer(["a picture of", "a photo", "a"], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match="padded input_ids"):
        model.generate(pixel_values, input_ids=prompts.input_ids, attention_mask=prompts.attention_mask)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        model.generate(pixel_values, input_ids=prompts.input_ids[:2])


@torch.no_grad()
def test_sampling_returns_several_captions_per_image(config, pixel_values):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    ids = model.generate(pixel_values, do_sample=True, top_p=0.9, num_beams=1, num_return_sequences=2, max_length=10)
    assert ids.shape[0] == 6 and (ids[:, 0] == config.text_config.decoder_bos_token_id).all()


def test_caption_loss_masks_pads_and_prompt(config, pixel_values, text_ids):
    """The LM loss equals label-smoothed cross entropy over the caption tokens only, computed by hand."""
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    ids = text_ids.clone()
    ids[0, -2:] = 0  # padding in the first caption
    prompt_length = 2
    out = model(pixel_values, ids, labels=ids, prompt_length=prompt_length)
    losses = []
    for row in range(ids.shape[0]):
        for position in range(prompt_length + 1, ids.shape[1]):  # positions after [DEC] + prompt
            if ids[row, position] == 0:
                continue
            logits = out.logits[row, position - 1]
            log_probs = logits.log_softmax(-1)
            smoothing = config.text_config.label_smoothing
            nll = -log_probs[ids[row, position]]
            losses.append((1 - smoothing) * nll - smoothing * log_probs.mean())
    assert out.loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_vqa_loss_is_weighted_sum_over_answers(config, pixel_values, tokenizer):
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    questions = tokenizer(["what colour ?", "how many ?", "is the square red ?"], padding=True, return_tensors="pt")
    answers = tokenizer(["red", "blue", "two", "yes", "no", "yes"], padding=True, return_tensors="pt")
    counts = torch.tensor([2, 1, 3])
    weights = torch.tensor([0.7, 0.3, 1.0, 0.5, 0.25, 0.25])
    out = model(
        questions.input_ids,
        pixel_values,
        attention_mask=questions.attention_mask,
        answer_input_ids=answers.input_ids,
        answer_attention_mask=answers.attention_mask,
        answer_weights=weights,
        answer_counts=counts,
    )
    # By hand: each answer's summed smoothed token loss, weighted, summed, divided by the number of questions.
    targets = answers.input_ids.masked_fill(answers.input_ids == 0, -100)[:, 1:]
    per_token = F.cross_entropy(
        out.logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none", label_smoothing=0.1
    )
    expected = (weights * per_token.sum(1)).sum() / 3
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="answer_counts sums to 5"):
        model(
            questions.input_ids,
            pixel_values,
            answer_input_ids=answers.input_ids,
            answer_counts=torch.tensor([2, 2, 1]),
        )


@torch.no_grad()
def test_rank_picks_the_most_likely_candidate(config, pixel_values, tokenizer):
    """`rank` agrees with scoring every candidate in full by hand (k = all candidates)."""
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    questions = tokenizer(["what colour is the square ?"] * 3, return_tensors="pt")
    candidates = tokenizer(["red", "blue", "green", "yellow square", "two"], padding=True, return_tensors="pt")
    ranking = model.rank(
        questions.input_ids,
        pixel_values,
        candidates.input_ids,
        attention_mask=questions.attention_mask,
        candidate_attention_mask=candidates.attention_mask,
        k=5,
    )
    for q in range(3):
        scores = []
        for c in range(5):
            out = model(
                questions.input_ids[q : q + 1],
                pixel_values[q : q + 1],
                answer_input_ids=candidates.input_ids[c : c + 1],
                answer_attention_mask=candidates.attention_mask[c : c + 1],
            )
            log_probs = out.logits[0, :-1].log_softmax(-1)
            target = candidates.input_ids[c, 1:]
            keep = target != 0
            scores.append(log_probs[torch.arange(len(target)), target][keep].sum())
        assert ranking.answer_index[q].item() == int(torch.stack(scores).argmax())
        assert sorted(ranking.topk_log_probs[q].tolist()) == pytest.approx(sorted(s.item() for s in scores), abs=1e-4)


def test_enc_and_dec_tokens_are_put_in_place(config, pixel_values, text_ids):
    """Passing [CLS] text or text that already starts with [ENC] gives the same ITM logits."""
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():
        plain = model(text_ids, pixel_values).itm_logits
        pre_replaced = model(replace_first_token(text_ids, 127), pixel_values).itm_logits
        other_first = model(replace_first_token(text_ids, 110), pixel_values).itm_logits
    assert torch.equal(plain, pre_replaced) and torch.equal(plain, other_first)


def test_gradient_checkpointing_gives_the_same_gradients(config, pixel_values, text_ids):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).train()
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        model(pixel_values, text_ids, labels=text_ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert model.vision_model.encoder.layers[0].gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_drop_path_only_in_training(config, pixel_values):
    config.vision_config.drop_path_rate = 0.5
    torch.manual_seed(0)
    model = BlipVisionModel(config.vision_config)
    model.eval()
    with torch.no_grad():
        first, second = model(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)


@pytest.mark.parametrize("how", ["weights", "autocast"])
def test_bf16_forward_and_generate_have_no_nan(config, pixel_values, text_ids, how):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    retrieval = BlipForImageTextRetrieval(config).eval()
    if how == "weights":
        model, retrieval, pixels = model.to(torch.bfloat16), retrieval.to(torch.bfloat16), pixel_values.bfloat16()
        context = torch.no_grad()
    else:
        pixels = pixel_values
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    with context, torch.no_grad():
        logits = model(pixels, text_ids).logits
        ids = model.generate(pixels, num_beams=3, max_length=8)
        scores = retrieval(text_ids, pixels).itm_logits
    assert torch.isfinite(logits.float()).all() and torch.isfinite(scores.float()).all()
    assert ids.shape[0] == 3 and ids.shape[1] >= 5


def test_vqa_answer_decoder_reads_question_width(tokenizer):
    """With a ViT wider than the text model (as ViT-L with BERT-base), the answer decoder still fits the question."""
    from conftest import make_config

    config = make_config()
    config.vision_config.hidden_size = 48
    config = type(config)(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict())
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    assert model.text_encoder.encoder.layer[0].crossattention.self.key.in_features == 48
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.in_features == 32
    questions = tokenizer(["what colour ?"] * 2, return_tensors="pt")
    answers = tokenizer(["red", "blue"], return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    loss = model(questions.input_ids, pixels, answer_input_ids=answers.input_ids).loss
    assert torch.isfinite(loss)
    assert model.generate(questions.input_ids, pixels, max_length=6).shape[0] == 2
