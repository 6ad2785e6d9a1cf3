"""Original Salesforce BLIP checkpoints (`.pth`) <-> our heads.

The released key layouts (names and shapes of every variant) are in `fixtures/original_keys/`; the weights themselves
are not needed to check that every tensor has a place. Round trips use tiny random heads exported to the original
layout.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipForVisualReasoning,
    BlipImageTextProcessor,
)
from transformers_blip.convert.original import (
    HEADS,
    infer_config,
    load_original_checkpoint,
    original_state_dict,
    plan_conversion,
    resolve_head,
    save_original_checkpoint,
)
from transformers_blip.convert.original_layout import (
    ORIGINAL_ALIASES,
    detect_variant,
    to_original,
    to_ours,
    top_module,
)
from transformers_blip.convert.writing import REPORT_NAME, IncompleteConversionError, save_original_conversion
from transformers_blip.modeling_nlvr import NEW_IN_NLVR_HEAD
from transformers_blip.modeling_pretraining import BlipForPreTraining

KEY_FILES = Path(__file__).parent / "fixtures" / "original_keys"
SCRIPT = Path(__file__).parents[1] / "training_scripts" / "convert_original_checkpoint.py"
VOCAB_FILE = Path(__file__).parent / "fixtures" / "vocab.txt"
LOGGER = "transformers_blip.convert.original"


def read_key_file(name: str) -> dict[str, tuple[int, ...]]:
    """`name<TAB>(shape)<TAB>dtype` lines (after a `#` header) -> {name: shape}."""
    shapes = {}
    for line in (KEY_FILES / f"{name}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            shapes[key] = tuple(ast.literal_eval(shape))
    return shapes


# (key file, variant, head names to load it into, expected (vision width, depth, heads, image size)).
RELEASED = [
    ("decoder_base_384", "captioning", ["auto"], (768, 12, 12, 384)),
    ("itm_base_384", "itm", ["auto"], (768, 12, 12, 384)),
    ("retrieval_base_384", "retrieval", ["auto"], (768, 12, 12, 384)),
    ("vqa_base_480", "vqa", ["auto"], (768, 12, 12, 480)),
    ("nlvr_base_384", "nlvr", ["auto"], (768, 12, 12, 384)),
    ("pretrain_base_224", "pretraining", list(HEADS), (768, 12, 12, 224)),
    ("pretrain_large_224", "pretraining", list(HEADS), (1024, 24, 16, 224)),
]
RELEASED_CASES = [(name, variant, head, vit) for name, variant, heads, vit in RELEASED for head in heads]


# The original modules each head takes; the rest of a checkpoint is dropped as expected.
HEAD_TAKES = {
    "captioning": {"visual_encoder", "text_decoder"},
    "retrieval": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp"},
    "vqa": {"visual_encoder", "text_encoder", "text_decoder"},
    "features": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "temp"},
    "nlvr": {"visual_encoder", "text_encoder", "cls_head"},
    "pretraining": {"visual_encoder", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head", "temp"}
    | {"visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m", "image_queue", "text_queue", "queue_ptr"},
}


def dropped_inside_a_taken_module(original_key: str, reason: str) -> bool:
    """Drops that happen even in modules a head takes: buffers, tied copies, the momentum encoder's cross-attention."""
    return (
        original_key.endswith("embeddings.position_ids")
        or reason.startswith("tied duplicate")
        or (original_key.startswith("text_encoder_m.") and ".crossattention." in original_key)
    )


@pytest.mark.parametrize("name, variant, heads, vit", RELEASED)
def test_config_is_inferred_from_shapes(name, variant, heads, vit):
    shapes = read_key_file(name)
    assert detect_variant(shapes) == variant
    config = infer_config(shapes)
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size) == vit
    assert (vision.patch_size, vision.layer_norm_eps) == (16, 1e-6)
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
        30524,
        768,
        12,
        12,
    )
    assert (text.hidden_dropout_prob, text.attention_probs_dropout_prob, text.label_smoothing) == (0.1, 0.1, 0.1)
    assert infer_config(shapes, image_size=384).vision_config.image_size == 384
    if variant == "nlvr":
        assert config.nlvr_merge_from_layer == 6  # layers 6-11 concatenate the two images' attention outputs


def unloadable_answer_decoder_keys(shapes, model) -> set[str]:
    """VQA's answer decoder cross-attends to question states (text width) in the original. A ViT-L pretraining
    decoder cross-attends to 1024-wide image states, so where our answer decoder reads text width those keys/values
    cannot load (the original drops them too, silently). Empty for every base checkpoint."""
    if not isinstance(model, BlipForQuestionAnswering):
        return set()
    pattern = re.compile(r"text_decoder\.bert\.encoder\.layer\.\d+\.crossattention\.self\.(key|value)\.")
    model_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    return {key for key in shapes if pattern.match(key) and shapes[key] != model_shapes[to_ours(key)]}


@pytest.mark.parametrize("name, variant, head, vit", RELEASED_CASES)
def test_every_released_tensor_has_a_place(name, variant, head, vit):
    shapes = read_key_file(name)
    config = infer_config(shapes)
    head_class = resolve_head(head, variant)
    with torch.device("meta"):
        model = head_class(config)
    plan = plan_conversion(shapes, model, variant)
    report = plan.report
    model_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}

    # Nothing unexpected: every tensor loads with its own shape or is one of the expected drops.
    unloadable = unloadable_answer_decoder_keys(shapes, model)
    assert set(report.dropped_unexpected) == unloadable
    assert set(report.missing) == {to_ours(key) for key in unloadable}
    for our_key, original_key in plan.sources.items():
        assert shapes[original_key] == model_shapes[our_key], our_key
    takes = HEAD_TAKES[next(name for name, cls in HEADS.items() if cls is head_class)]
    for original_key in shapes:
        module, reason = top_module(original_key), report.dropped_expected.get(original_key)
        if module in takes:
            assert reason is None or dropped_inside_a_taken_module(original_key, reason), (original_key, reason)
        else:
            assert reason is not None, original_key
    # (Into the NLVR2 head one cross-attention tensor fills both of a layer's image attentions.)
    assert len(set(plan.sources.values())) + len(report.dropped_expected) + len(unloadable) == len(shapes)

    # Every tensor of the head is filled: loaded, tied to a loaded one, or a documented default.
    covered = set(report.loaded) | set(model.all_tied_weights_keys) | set(report.defaulted) | set(report.missing)
    assert covered == set(model_shapes)
    if variant == "itm" or head_class is BlipForPreTraining:
        assert set(report.defaulted) == ({"temp"} if variant == "itm" else {"idx_queue"})
    elif head_class is BlipForVisualReasoning and variant != "nlvr":
        # A pretraining checkpoint has no classifier and no merge layers (layers 6-11): both start random.
        assert len(report.defaulted) == 4 + 6 * 2
        assert all(NEW_IN_NLVR_HEAD.search(key) for key in report.defaulted)
        layer = "text_encoder.encoder.layer.3.crossattention."
        for copy_index in (0, 1):
            assert plan.sources[f"{layer}self{copy_index}.query.weight"] == f"{layer}self.query.weight"
            assert plan.sources[f"{layer}output.dense{copy_index}.bias"] == f"{layer}output.dense.bias"
    else:
        assert report.defaulted == {}


@pytest.mark.parametrize("name", [path.stem for path in KEY_FILES.glob("*.txt")])
def test_renaming_inverts(name):
    for key in read_key_file(name):
        # An alias (the retrieval model's `ptr_queue`) loads into our name and exports as it.
        assert to_original(to_ours(key)) == ORIGINAL_ALIASES.get(key, key)
    assert (
        to_ours("visual_encoder.blocks.11.attn.proj.weight")
        == "vision_model.encoder.layers.11.self_attn.projection.weight"
    )
    assert to_ours("visual_encoder_m.norm.bias") == "vision_model_m.post_layernorm.bias"
    assert to_ours("text_decoder.bert.encoder.layer.0.attention.self.query.weight").startswith("text_decoder.bert.")


@pytest.mark.parametrize(
    "name, head_class, extra",
    [
        ("decoder_base_384", BlipForConditionalGeneration, set()),
        ("itm_base_384", BlipForImageTextRetrieval, {"temp"}),
        ("vqa_base_480", BlipForQuestionAnswering, set()),
        ("nlvr_base_384", BlipForVisualReasoning, set()),
    ],
)
def test_exported_names_are_the_released_ones(name, head_class, extra):
    shapes = read_key_file(name)
    with torch.device("meta"):
        model = head_class(infer_config(shapes))
    exported = {to_original(key) for key in model.state_dict()}
    # `original_state_dict` adds a position-id buffer beside each text position table (it needs real tensors).
    tables = {key for key in exported if key.endswith("embeddings.position_embeddings.weight")}
    exported |= {key.replace("position_embeddings.weight", "position_ids") for key in tables}
    assert exported == set(shapes) | extra


def test_pretraining_checkpoint_asks_for_a_head():
    with pytest.raises(ValueError, match="choose one with head="):
        resolve_head("auto", "pretraining")


# ---- Round trips through tiny exported checkpoints -----------------------------------------------------------------


def export_like_pretraining(model, path: Path) -> set[str]:
    """Exports `model`, adding what a pretraining checkpoint carries besides (a momentum ViT and projection, ITC
    queues and their pointer); returns the keys that loading must drop as expected."""
    state_dict = original_state_dict(model)
    extras = {
        "visual_encoder_m." + key.removeprefix("visual_encoder."): tensor.clone()
        for key, tensor in state_dict.items()
        if key.startswith("visual_encoder.")
    }
    extras["vision_proj_m.weight"] = torch.randn(16, model.config.vision_config.hidden_size)
    extras["image_queue"] = torch.randn(16, 8)
    extras["text_queue"] = torch.randn(16, 8)
    extras["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"model": {**state_dict, **extras}}, path)
    return set(extras) | {key for key in state_dict if key.endswith("position_ids")}


def random_head(head_class, **config_overrides):
    torch.manual_seed(0)
    return head_class(make_config(**config_overrides)).eval()


def assert_report_names_extras(report, extras):
    assert report.dropped_unexpected == {} and report.missing == []
    assert set(extras) <= set(report.dropped_expected)
    assert set(report.dropped_expected) - set(extras) <= {
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.cls.predictions.decoder.bias",
    }


@torch.no_grad()
def test_captioning_round_trip(tmp_path, config, pixel_values, text_ids):
    model = random_head(BlipForConditionalGeneration)
    extras = export_like_pretraining(model, tmp_path / "caption.pth")
    loaded, report = load_original_checkpoint(tmp_path / "caption.pth", config=config)
    assert type(loaded) is BlipForConditionalGeneration and report.variant == "captioning"
    assert_report_names_extras(report, extras)
    assert torch.equal(loaded(pixel_values, text_ids).logits, model(pixel_values, text_ids).logits)
    for settings in (dict(num_beams=1), dict(num_beams=3)):
        assert torch.equal(
            loaded.generate(pixel_values, max_length=10, **settings),
            model.generate(pixel_values, max_length=10, **settings),
        )


@torch.no_grad()
def test_retrieval_round_trip(tmp_path, config, pixel_values, text_ids):
    model = random_head(BlipForImageTextRetrieval)
    model.temp.fill_(0.05)
    extras = export_like_pretraining(model, tmp_path / "retrieval.pth")
    loaded, report = load_original_checkpoint(tmp_path / "retrieval.pth", config=config)
    assert type(loaded) is BlipForImageTextRetrieval and report.variant == "retrieval"
    assert_report_names_extras(report, extras)
    ours, theirs = loaded(text_ids, pixel_values), model(text_ids, pixel_values)
    assert torch.equal(ours.itm_score, theirs.itm_score)
    assert torch.equal(ours.itc_similarity, theirs.itc_similarity)
    assert loaded.temp.item() == pytest.approx(0.05)


@torch.no_grad()
def test_vqa_round_trip(tmp_path, config, pixel_values, text_ids):
    model = random_head(BlipForQuestionAnswering)
    extras = export_like_pretraining(model, tmp_path / "vqa.pth")
    loaded, report = load_original_checkpoint(tmp_path / "vqa.pth", config=config)
    assert type(loaded) is BlipForQuestionAnswering and report.variant == "vqa"
    assert_report_names_extras(report, extras)
    assert torch.equal(loaded.generate(text_ids, pixel_values), model.generate(text_ids, pixel_values))
    answers = text_ids[:, :4]
    ours = loaded(text_ids, pixel_values, answer_input_ids=answers)
    theirs = model(text_ids, pixel_values, answer_input_ids=answers)
    assert torch.equal(ours.logits, theirs.logits)


@torch.no_grad()
def test_pretraining_round_trip_keeps_momentum_and_queues(tmp_path):
    model = random_head(BlipForPreTraining, queue_size=8)
    for momentum_param in (*model.vision_model_m.parameters(), *model.text_proj_m.parameters()):
        momentum_param.add_(torch.randn_like(momentum_param))  # no longer equal to the online copy
    save_original_checkpoint(model, tmp_path / "pretrain.pth")
    loaded, report = load_original_checkpoint(tmp_path / "pretrain.pth", head="pretraining", config=model.config)
    assert report.variant == "pretraining" and report.is_complete
    assert report.defaulted == {}  # our export keeps the image-id queue, which the original's files lack
    expected_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert loaded_state.keys() == expected_state.keys()
    for key, tensor in expected_state.items():
        assert torch.equal(loaded_state[key], tensor), key
    # Shared encoder/decoder tensors stay one parameter after loading.
    shared = loaded.text_decoder.bert.encoder.layer[0].crossattention.self.query.weight
    assert shared is loaded.text_encoder.encoder.layer[0].crossattention.self.query.weight


def test_pretraining_checkpoint_into_task_heads(tmp_path):
    model = random_head(BlipForPreTraining, queue_size=8)
    save_original_checkpoint(model, tmp_path / "pretrain.pth")
    loaded, report = load_original_checkpoint(tmp_path / "pretrain.pth", head="captioning", config=model.config)
    assert report.is_complete
    assert "text_encoder.embeddings.word_embeddings.weight" in report.dropped_expected
    for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.key.weight"):
        assert torch.equal(loaded.text_decoder.get_parameter(name), model.text_decoder.get_parameter(name))
    # VQA takes both text models: the question encoder from the text encoder, the answer decoder from the decoder.
    loaded, report = load_original_checkpoint(tmp_path / "pretrain.pth", head="vqa", config=model.config)
    assert report.is_complete
    decoder_self_attention = loaded.text_decoder.bert.encoder.layer[1].attention.self.key.weight
    assert torch.equal(decoder_self_attention, model.text_decoder.bert.encoder.layer[1].attention.self.key.weight)
    assert not torch.equal(decoder_self_attention, loaded.text_encoder.encoder.layer[1].attention.self.key.weight)


# ---- Resizing, mismatches, the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("new_size", [16, 48])
@torch.no_grad()
def test_position_embeddings_resize_like_runtime_interpolation(tmp_path, text_ids, new_size):
    model = random_head(BlipForConditionalGeneration)  # 32px images, 8px patches: a 4x4 grid
    # Positions as large as the patch features, so that any other interpolation shows in the outputs.
    model.vision_model.embeddings.position_embedding.normal_(std=1.0)
    save_original_checkpoint(model, tmp_path / "caption.pth")
    loaded, report = load_original_checkpoint(tmp_path / "caption.pth", image_size=new_size, config=model.config)
    grid = new_size // 8
    key = "vision_model.embeddings.position_embedding"
    assert report.resized == {key: ((1, 17, 32), (1, 1 + grid * grid, 32))}
    assert loaded.config.vision_config.image_size == new_size and model.config.vision_config.image_size == 32

    pixels = torch.randn(2, 3, new_size, new_size, generator=torch.Generator().manual_seed(3))
    resized = loaded(pixels, text_ids[:2])
    runtime = model(pixels, text_ids[:2])  # interpolates the 4x4 table on the fly
    assert (resized.image_embeds - runtime.image_embeds).abs().max() <= 1e-5
    assert (resized.logits - runtime.logits).abs().max() <= 1e-5


def test_shape_mismatch_is_reported_not_silent(tmp_path, caplog):
    model = random_head(BlipForConditionalGeneration)
    save_original_checkpoint(model, tmp_path / "caption.pth")
    bigger_vocab = make_config()
    bigger_vocab.text_config.vocab_size = 130
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded, report = load_original_checkpoint(tmp_path / "caption.pth", config=bigger_vocab)

    mismatched = {
        "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.bias",
        "text_decoder.cls.predictions.decoder.weight",
        "text_decoder.cls.predictions.decoder.bias",
    }
    assert set(report.dropped_unexpected) == mismatched
    assert (
        "(128, 32) in the checkpoint, (130, 32)"
        in report.dropped_unexpected["text_decoder.bert.embeddings.word_embeddings.weight"]
    )
    assert set(report.missing) == {
        "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.bias",
    }
    assert not report.is_complete
    warnings = "\n".join(record.getMessage() for record in caplog.records if record.levelno == logging.WARNING)
    for key in mismatched:
        assert key in warnings
    infos = "\n".join(record.getMessage() for record in caplog.records if record.levelno == logging.INFO)
    assert "position_ids" in infos and "position_ids" not in warnings
    assert loaded.text_decoder.bert.embeddings.word_embeddings.weight.shape == (130, 32)


def test_unknown_key_and_disagreeing_tied_copy_are_reported(tmp_path):
    model = random_head(BlipForConditionalGeneration)
    state_dict = original_state_dict(model)
    state_dict["text_decoder.bert.encoder.layer.0.crossattention.self0.query.weight"] = torch.zeros(32, 32)
    state_dict["text_decoder.cls.predictions.decoder.weight"] = torch.zeros(128, 32)  # no longer the embeddings
    _, report = load_original_checkpoint({"model": state_dict}, config=model.config)
    assert (
        "unknown name"
        in report.dropped_unexpected["text_decoder.bert.encoder.layer.0.crossattention.self0.query.weight"]
    )
    assert "differs from" in report.dropped_unexpected["text_decoder.cls.predictions.decoder.weight"]
    assert report.missing == []


def test_config_inference_needs_a_config_for_unusual_widths(tmp_path):
    model = random_head(BlipForConditionalGeneration)  # 32-wide: not a multiple of BLIP's 64-wide heads
    with pytest.raises(ValueError, match="give the config"):
        load_original_checkpoint(original_state_dict(model))


@torch.no_grad()
def test_command_line_writes_a_loadable_directory(tmp_path, pixel_values, text_ids):
    model = random_head(BlipForConditionalGeneration)
    extras = export_like_pretraining(model, tmp_path / "caption.pth")
    model.config.save_pretrained(tmp_path / "config")
    output = tmp_path / "converted"
    command = [sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "caption.pth"), "--output", str(output)]
    command += ["--config", str(tmp_path / "config"), "--vocab_file", str(VOCAB_FILE)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "dropped as expected" in result.stdout

    loaded = BlipForConditionalGeneration.from_pretrained(output).eval()
    assert torch.equal(loaded(pixel_values, text_ids).logits, model(pixel_values, text_ids).logits)
    report = json.loads((output / "conversion_report.json").read_text())
    assert set(extras) <= set(report["dropped_expected"]) and report["dropped_unexpected"] == {}
    processor = BlipImageTextProcessor.from_pretrained(output)
    assert len(processor.tokenizer) == 128 and processor.tokenizer.convert_ids_to_tokens(126) == "[DEC]"


@torch.no_grad()
def test_a_conversion_is_written_only_when_its_checks_pass(tmp_path, pixel_values, text_ids):
    model = random_head(BlipForConditionalGeneration)
    state_dict = original_state_dict(model)
    del state_dict["visual_encoder.norm.weight"]  # now missing
    torch.save({"model": state_dict}, tmp_path / "partial.pth")
    loaded, report = load_original_checkpoint(tmp_path / "partial.pth", config=model.config)
    output = tmp_path / "converted"
    with pytest.raises(IncompleteConversionError, match="0 tensors dropped unexpectedly and 1 missing"):
        save_original_conversion(loaded, report, output, vocab_file=VOCAB_FILE)
    assert not output.exists()

    longer_vocab = tmp_path / "longer_vocab.txt"  # a vocabulary the checkpoint was not trained with
    longer_vocab.write_text(VOCAB_FILE.read_text().rstrip("\n") + "\nzebra\n")
    with pytest.raises(ValueError, match="gives 129 tokens with .* not the vocabulary") as refusal:
        save_original_conversion(loaded, report, output, vocab_file=longer_vocab, allow_partial=True)
    assert str(longer_vocab) in str(refusal.value) and not output.exists()
    with pytest.raises(ValueError, match="cannot read the vocab file.*absent.txt"):
        save_original_conversion(loaded, report, output, vocab_file=tmp_path / "absent.txt", allow_partial=True)
    assert not output.exists()

    save_original_conversion(loaded, report, output, vocab_file=VOCAB_FILE, allow_partial=True)
    written = json.loads((output / REPORT_NAME).read_text())
    assert written["missing"] == report.missing == ["vision_model.post_layernorm.weight"]
    assert len(BlipImageTextProcessor.from_pretrained(output).tokenizer) == 128
    reloaded = BlipForConditionalGeneration.from_pretrained(output).eval()
    assert torch.equal(reloaded(pixel_values, text_ids).logits, loaded(pixel_values, text_ids).logits)
    with pytest.raises(FileExistsError):
        save_original_conversion(loaded, report, output, allow_partial=True)
    save_original_conversion(loaded, report, output, allow_partial=True, transformers_layout=True, overwrite=True)
    assert not (output / "preprocessor_config.json").exists()  # replaced whole, not written over
    assert json.loads((output / "config.json").read_text())["model_type"] == "blip"  # transformers' layout
