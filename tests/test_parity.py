"""Numerical parity with transformers' own BLIP classes on the same weights (fp32, max abs diff <= 1e-5).

transformers' heads do not put `[ENC]` / `[DEC]` in place themselves, so their inputs get them here; ours take the
ordinary `[CLS] ... [SEP]` text.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from transformers_blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering
from transformers_blip.convert.transformers_layout import save_in_transformers_layout
from transformers_blip.modeling_blip import replace_first_token

ATOL = 1e-5


def paired_models(our_class, their_class, config, seed=0):
    """Our head with random weights, and transformers' head of the same kind holding the very same tensors."""
    torch.manual_seed(seed)
    ours = our_class(config).eval()
    theirs = their_class(transformers.BlipConfig.from_dict(config.to_transformers_dict())).eval()
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {"temp"}
    return ours, theirs


def with_padding(text_ids):
    """Shortens the last text by two tokens (pads at the end), to exercise attention masks."""
    ids, mask = text_ids.clone(), torch.ones_like(text_ids)
    ids[-1, -3] = 102
    ids[-1, -2:] = 0
    mask[-1, -2:] = 0
    return ids, mask


@torch.no_grad()
def test_captioning_logits_and_loss_match(config, pixel_values, text_ids):
    ours, theirs = paired_models(BlipForConditionalGeneration, transformers.BlipForConditionalGeneration, config)
    ids, mask = with_padding(text_ids)
    dec_ids = replace_first_token(ids, config.text_config.decoder_bos_token_id)
    our_out = ours(pixel_values, ids, attention_mask=mask, labels=ids)
    their_out = theirs(
        pixel_values=pixel_values, input_ids=dec_ids, attention_mask=mask, labels=dec_ids.masked_fill(mask == 0, -100)
    )
    assert (our_out.logits - their_out.logits).abs().max() <= ATOL
    assert their_out.loss.item() == pytest.approx(our_out.loss.item(), abs=ATOL)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("with_prompt", [False, True])
@torch.no_grad()
def test_captioning_generate_matches(config, pixel_values, tokenizer, num_beams, with_prompt):
    ours, theirs = paired_models(BlipForConditionalGeneration, transformers.BlipForConditionalGeneration, config)
    prompt = tokenizer(["a picture of"] * 3, return_tensors="pt").input_ids if with_prompt else None
    settings = dict(num_beams=num_beams, max_length=16, min_length=5)
    our_ids = ours.generate(pixel_values, input_ids=prompt, **settings)
    their_ids = theirs.generate(
        pixel_values=pixel_values, input_ids=prompt.clone() if with_prompt else None, **settings
    )
    assert our_ids.tolist() == their_ids.tolist()
    assert our_ids.shape[1] > (5 if with_prompt else 2)  # something was generated after the prompt


@torch.no_grad()
def test_retrieval_scores_match(config, pixel_values, text_ids):
    ours, theirs = paired_models(BlipForImageTextRetrieval, transformers.BlipForImageTextRetrieval, config)
    ids, mask = with_padding(text_ids)
    out = ours(ids, pixel_values, attention_mask=mask)
    enc_ids = replace_first_token(ids, config.text_config.encoder_token_id)
    their_itm = theirs(input_ids=enc_ids, pixel_values=pixel_values, attention_mask=mask, use_itm_head=True).itm_score
    their_itc = theirs(input_ids=ids, pixel_values=pixel_values, attention_mask=mask, use_itm_head=False).itm_score
    assert (out.itm_logits - their_itm).abs().max() <= ATOL
    assert (out.itc_similarity - their_itc).abs().max() <= ATOL
    assert torch.allclose(out.itm_score, their_itm.softmax(-1)[:, 1], atol=ATOL)


@torch.no_grad()
def test_question_answering_matches(config, pixel_values, tokenizer):
    ours, theirs = paired_models(BlipForQuestionAnswering, transformers.BlipForQuestionAnswering, config)
    questions = tokenizer(["what colour is the square ?"] * 3, return_tensors="pt")
    answers = tokenizer(["red", "blue", "green"], padding="longest", return_tensors="pt")
    enc_ids = replace_first_token(questions.input_ids, config.text_config.encoder_token_id)

    ours_out = ours(
        questions.input_ids,
        pixel_values,
        attention_mask=questions.attention_mask,
        answer_input_ids=answers.input_ids,
        answer_attention_mask=answers.attention_mask,
    )
    image_embeds = theirs.vision_model(pixel_values).last_hidden_state
    their_question = theirs.text_encoder(
        input_ids=enc_ids, attention_mask=questions.attention_mask, encoder_hidden_states=image_embeds
    ).last_hidden_state
    assert (ours_out.question_embeds - their_question).abs().max() <= ATOL
    dec_answers = replace_first_token(answers.input_ids, config.text_config.decoder_bos_token_id)
    their_logits = theirs.text_decoder(
        input_ids=dec_answers,
        attention_mask=answers.attention_mask,
        encoder_hidden_states=their_question,
        encoder_attention_mask=questions.attention_mask,
    ).logits
    assert (ours_out.logits - their_logits).abs().max() <= ATOL

    for num_beams in (1, 3):
        settings = dict(num_beams=num_beams, max_length=10, min_length=1)
        our_answers = ours.generate(
            questions.input_ids, pixel_values, attention_mask=questions.attention_mask, **settings
        )
        their_answers = theirs.generate(input_ids=enc_ids, pixel_values=pixel_values, **settings)
        assert our_answers.tolist() == their_answers.tolist()


@pytest.mark.parametrize(
    "our_class,their_class",
    [
        (BlipForConditionalGeneration, transformers.BlipForConditionalGeneration),
        (BlipForImageTextRetrieval, transformers.BlipForImageTextRetrieval),
        (BlipForQuestionAnswering, transformers.BlipForQuestionAnswering),
    ],
)
def test_transformers_layout_round_trip(config, tmp_path, our_class, their_class):
    """Ours -> transformers' layout -> transformers' class -> its own save -> ours again, tensors unchanged."""
    torch.manual_seed(3)
    ours = our_class(config).eval()
    save_in_transformers_layout(ours, tmp_path / "theirs")
    theirs = their_class.from_pretrained(tmp_path / "theirs")
    their_state = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        if name != "temp":
            assert torch.equal(their_state[name], tensor), name

    theirs.save_pretrained(tmp_path / "hub_style")  # what a `Salesforce/blip-*` repo holds
    reloaded = our_class.from_pretrained(tmp_path / "hub_style")
    assert reloaded.config.model_type == "tblip"
    assert reloaded.config.text_config.decoder_bos_token_id == 126  # transformers' bos_token_id names [DEC]
    assert reloaded.config.text_config.encoder_token_id == 127  # BLIP's convention: vocab size - 1
    for name, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
