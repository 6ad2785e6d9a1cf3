"""Conversion beyond the round trips of `test_convert_original.py`: the one position-embedding interpolation, every
head from every pretraining source saved and fine-tuned apart, feature-extractor and retrieval state dicts, explicit
head counts, and what the command line refuses."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config
from test_convert_original import read_key_file

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipForVisualReasoning,
    BlipModel,
)
from transformers_blip.convert.original import (
    infer_config,
    load_original_checkpoint,
    original_state_dict,
    plan_conversion,
    resolve_head,
    save_original_checkpoint,
)
from transformers_blip.convert.original_layout import ORIGINAL_MODULES, detect_variant, to_original, top_module
from transformers_blip.convert.pretraining import task_head_from_pretraining
from transformers_blip.modeling_pretraining import MOMENTUM_PAIRS, QUEUE_BUFFERS, BlipForPreTraining
from transformers_blip.modeling_vision import BlipVisionEmbeddings, interpolate_position_embedding

SCRIPT = Path(__file__).parents[1] / "training_scripts" / "convert_original_checkpoint.py"
POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"


def random_model(head_class, **config_overrides):
    torch.manual_seed(0)
    return head_class(make_config(**config_overrides)).eval()


# ---- The position-embedding interpolation --------------------------------------------------------------------------


def cubic_weight(distance: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    distance = abs(distance)
    if distance <= 1:
        return (a + 2) * distance**3 - (a + 3) * distance**2 + 1
    if distance < 2:
        return a * distance**3 - 5 * a * distance**2 + 8 * a * distance - 4 * a
    return 0.0


def bicubic_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights of half-pixel-centred bicubic resampling with edge replication."""
    weights = np.zeros((target, source))
    for row in range(target):
        centre = (row + 0.5) * source / target - 0.5
        first = math.floor(centre)
        for tap in range(first - 1, first + 3):
            weights[row, min(max(tap, 0), source - 1)] += cubic_weight(centre - tap)
    return weights


def reference_interpolation(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, 1 + s*s, D) -> (1, 1 + h*w, D), written out: [CLS] kept, the s x s grid of each channel resampled."""
    table = table.double().numpy()
    side = math.isqrt(table.shape[1] - 1)
    grid = table[0, 1:].reshape(side, side, -1)  # (s, s, D)
    resized = np.einsum("hi,ijd,wj->hwd", bicubic_matrix(side, height), grid, bicubic_matrix(side, width))
    return torch.from_numpy(np.concatenate([table[:, :1], resized.reshape(1, height * width, -1)], axis=1))


@pytest.mark.parametrize("side, height, width", [(4, 6, 6), (14, 24, 24), (6, 3, 5), (5, 5, 5)])
def test_interpolation_equals_bicubic_written_out(side, height, width):
    table = torch.randn(1, 1 + side * side, 8, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    resized = interpolate_position_embedding(table, height, width)
    assert resized.shape == (1, 1 + height * width, 8) and resized.dtype == torch.float64
    torch.testing.assert_close(resized, reference_interpolation(table, height, width), atol=1e-5, rtol=1e-5)
    assert torch.equal(resized[:, 0], table[:, 0])


def test_runtime_resizing_is_the_same_function():
    config = make_config().vision_config
    embeddings = BlipVisionEmbeddings(config)
    with torch.no_grad():
        embeddings.position_embedding.normal_()
    expected = reference_interpolation(embeddings.position_embedding.detach(), 6, 6).float()
    torch.testing.assert_close(embeddings.position_embedding_for(6, 6).detach(), expected, atol=1e-5, rtol=1e-5)


def test_a_grid_that_is_not_square_is_refused_by_name():
    with pytest.raises(ValueError, match="7 patches do not form a square grid"):
        interpolate_position_embedding(torch.zeros(1, 8, 4), 3, 3)
    model = random_model(BlipForConditionalGeneration)
    state_dict = original_state_dict(model)
    state_dict["visual_encoder.pos_embed"] = torch.zeros(1, 16, 32)  # 15 patches
    with pytest.raises(ValueError, match="visual_encoder.pos_embed.*square grid"):
        shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
        infer_config(shapes, text_num_attention_heads=4, vision_num_attention_heads=4)


@torch.no_grad()
def test_a_224_checkpoint_converts_to_384(tmp_path, text_ids):
    config = make_config(image_size=224)
    config.vision_config.patch_size = 16  # ViT-B/16's grid: 14 x 14 at 224 px, 24 x 24 at 384 px
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.vision_model.embeddings.position_embedding.normal_()
    save_original_checkpoint(model, tmp_path / "caption_224.pth")

    loaded, report = load_original_checkpoint(tmp_path / "caption_224.pth", image_size=384, config=config)
    assert report.resized == {POSITION_EMBEDDING: ((1, 197, 32), (1, 577, 32))} and report.is_complete
    assert loaded.config.vision_config.image_size == 384
    expected = reference_interpolation(model.vision_model.embeddings.position_embedding, 24, 24).float()
    torch.testing.assert_close(loaded.vision_model.embeddings.position_embedding, expected, atol=1e-5, rtol=1e-5)
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        loaded.vision_model(pixels).last_hidden_state, model.vision_model(pixels).last_hidden_state
    )


# ---- Momentum copies and queues are named once ---------------------------------------------------------------------


def test_momentum_copies_and_queues_are_expected_drops_under_their_one_name():
    with torch.device("meta"):
        pretraining = BlipForPreTraining(make_config())
    training_state = {name for _, name in MOMENTUM_PAIRS} | set(QUEUE_BUFFERS)
    keys = [key for key in pretraining.state_dict() if top_module(key) in training_state]
    assert {top_module(key) for key in keys} == training_state
    for key in keys:
        reason = ORIGINAL_MODULES[top_module(to_original(key))]
        assert "momentum copy" in reason or "training state" in reason, key
    assert all(
        any(pattern.startswith(f"^{name}") for pattern in pretraining._keys_to_ignore_on_load_missing)
        for name in training_state
    )


# ---- Every head from every pretraining source: saved, reloaded, fine-tuned apart -----------------------------------

# For each head, a parameter that comes from a pretraining tensor which also fills another of the head's parameters
# (or, where the head holds no such pair, one of its ViT's): a step on it alone must change nothing else.
STEPPED = {
    BlipModel: "vision_model.embeddings.patch_embedding.weight",
    BlipForConditionalGeneration: "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight",
    BlipForImageTextRetrieval: "text_encoder.encoder.layer.0.crossattention.self.query.weight",
    BlipForQuestionAnswering: "text_encoder.encoder.layer.0.crossattention.self.query.weight",
    BlipForVisualReasoning: "text_encoder.encoder.layer.0.crossattention.self0.query.weight",
}
# Its copy from the same pretraining tensor, where the head has one.
COPY = {
    BlipForQuestionAnswering: "text_decoder.bert.encoder.layer.0.crossattention.self.query.weight",
    BlipForVisualReasoning: "text_encoder.encoder.layer.0.crossattention.self1.query.weight",
}


@pytest.fixture(scope="module")
def pretraining():
    return random_model(BlipForPreTraining, queue_size=8)


def head_from(source: str, head_class, pretraining, tmp_path):
    if source == "our pretraining model":
        return task_head_from_pretraining(head_class, pretraining, output_report=True)
    # torch.save keeps the decoder's tensors one storage with the encoder's, as in the released `.pth` files.
    save_original_checkpoint(pretraining, tmp_path / "pretrain.pth")
    return load_original_checkpoint(tmp_path / "pretrain.pth", head=head_class, config=pretraining.config)


def storage_sharers(model) -> list[list[str]]:
    """Groups of distinct parameters (tied ones are one) whose memory overlaps."""
    by_storage = {}
    for name, param in model.named_parameters():
        by_storage.setdefault(param.untyped_storage().data_ptr(), []).append(name)
    return [names for names in by_storage.values() if len(names) > 1]


@pytest.mark.parametrize("head_class", list(STEPPED))
@pytest.mark.parametrize("source", ["our pretraining model", "original-layout pretraining state dict"])
def test_every_head_saves_reloads_and_trains_apart(tmp_path, pretraining, source, head_class):
    pretraining_before = {key: tensor.clone() for key, tensor in pretraining.state_dict().items()}
    model, report = head_from(source, head_class, pretraining, tmp_path)
    assert report.is_complete, report.summary()
    assert storage_sharers(model) == []
    pretraining_storages = {param.untyped_storage().data_ptr() for param in pretraining.parameters()}
    assert not any(param.untyped_storage().data_ptr() in pretraining_storages for param in model.parameters())
    if head_class in COPY:
        assert torch.equal(model.get_parameter(STEPPED[head_class]), model.get_parameter(COPY[head_class]))

    model.save_pretrained(tmp_path / "head")
    reloaded = head_class.from_pretrained(tmp_path / "head")
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key

    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.get_parameter(STEPPED[head_class]).sum().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name != STEPPED[head_class]), name
    for key, tensor in pretraining.state_dict().items():
        assert torch.equal(tensor, pretraining_before[key]), key


# ---- Checkpoints of other original models --------------------------------------------------------------------------


def test_a_feature_extractor_state_dict_loads_into_the_feature_model():
    model = random_model(BlipModel)
    # The original `BLIP_Base`: the ViT and the text encoder, nothing else.
    state_dict = {
        key: tensor
        for key, tensor in original_state_dict(model).items()
        if top_module(key) in ("visual_encoder", "text_encoder")
    }
    loaded, report = load_original_checkpoint(state_dict, config=model.config)
    assert type(loaded) is BlipModel and report.variant == "features" and report.is_complete
    assert set(report.defaulted) == {
        "vision_proj.weight",
        "vision_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
        "temp",
    }
    for key, tensor in model.state_dict().items():
        if top_module(key) in ("vision_model", "text_encoder"):
            assert torch.equal(loaded.state_dict()[key], tensor), key
    # With the projections and the temperature (what our feature model exports), nothing is defaulted.
    loaded, report = load_original_checkpoint(original_state_dict(model), config=model.config)
    assert report.variant == "features" and report.is_complete and report.defaulted == {}
    assert torch.equal(loaded.text_proj.weight, model.text_proj.weight)


def test_the_retrieval_models_queue_pointer_is_loaded():
    model = random_model(BlipForPreTraining, queue_size=8)
    model.queue_ptr.fill_(5)
    state_dict = original_state_dict(model)
    state_dict["ptr_queue"] = state_dict.pop("queue_ptr")  # the original retrieval model's name for it
    loaded, report = load_original_checkpoint(state_dict, head="pretraining", config=model.config)
    assert report.is_complete and "queue_ptr" in report.loaded and "ptr_queue" not in report.dropped_expected
    assert int(loaded.queue_ptr) == 5


def test_released_layouts_of_the_feature_extractor_and_the_retrieval_queues_have_a_place():
    # `BLIP_Base` holds what the pretraining model's ViT and text encoder hold.
    pretraining_shapes = read_key_file("pretrain_base_224")
    shapes = {
        key: shape
        for key, shape in pretraining_shapes.items()
        if top_module(key) in ("visual_encoder", "text_encoder")
    }
    assert detect_variant(shapes) == "features" and resolve_head("auto", "features") is BlipModel
    with torch.device("meta"):
        report = plan_conversion(shapes, BlipModel(infer_config(shapes)), "features").report
    assert report.is_complete and set(report.defaulted) == {
        "vision_proj.weight",
        "vision_proj.bias",
        "text_proj.weight",
        "text_proj.bias",
        "temp",
    }

    shapes = read_key_file("retrieval_base_384")
    with torch.device("meta"):
        report = plan_conversion(shapes, BlipForPreTraining(infer_config(shapes)), "retrieval").report
    assert (
        "queue_ptr" in report.loaded
        and "queue_ptr" not in report.missing
        and "ptr_queue" not in report.dropped_expected
    )


def test_head_counts_can_be_given_when_heads_are_not_64_wide():
    model = random_model(BlipForConditionalGeneration)  # 32 wide, 4 heads of 8
    state_dict = original_state_dict(model)
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    with pytest.raises(ValueError, match=r"text_num_attention_heads=, or --text_num_attention_heads"):
        infer_config(shapes, vision_num_attention_heads=4)
    with pytest.raises(ValueError, match="vision_num_attention_heads=5 does not divide the width 32"):
        infer_config(shapes, text_num_attention_heads=4, vision_num_attention_heads=5)
    loaded, report = load_original_checkpoint(state_dict, text_num_attention_heads=4, vision_num_attention_heads=4)
    assert report.is_complete
    assert loaded.config.text_config.num_attention_heads == loaded.config.vision_config.num_attention_heads == 4
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


# ---- The command line refuses what it cannot convert whole ---------------------------------------------------------


def crafted_files(tmp_path: Path) -> dict[str, Path]:
    """Small files the command line must refuse, each with the message it must give."""
    model = random_model(BlipForConditionalGeneration)
    good = tmp_path / "caption.pth"
    save_original_checkpoint(model, good)
    files = {"truncated": tmp_path / "truncated.pth", "empty": tmp_path / "empty.pth"}
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["empty"].write_bytes(b"")
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save(torch.zeros(2), tmp_path / "tensor.pth")
    state_dict = original_state_dict(model)
    state_dict["visual_encoder.cls_token"] = torch.full_like(state_dict["visual_encoder.cls_token"], float("nan"))
    torch.save({"model": state_dict}, tmp_path / "nan.pth")
    state_dict = original_state_dict(model)
    del state_dict["visual_encoder.norm.weight"]  # now missing
    torch.save({"model": state_dict}, tmp_path / "partial.pth")
    model.config.save_pretrained(tmp_path / "config")
    return files | {name: tmp_path / f"{name}.pth" for name in ("list", "tensor", "nan", "partial")}


EXPECTED_ERRORS = {
    "truncated": "truncated.pth is not a readable PyTorch checkpoint",
    "empty": "empty.pth is empty",
    "list": "list.pth holds a list, not a state dict",
    "tensor": "tensor.pth holds a Tensor, not a state dict",
    "nan": "hold NaN or Inf values: visual_encoder.cls_token",
    "partial": "1 missing (listed above); nothing written. Pass --allow_partial",
}


def conversion_command(checkpoint: Path, output: Path, *extra: str) -> list[str]:
    config = checkpoint.parent / "config"
    return [
        sys.executable,
        str(SCRIPT),
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(output),
        "--config",
        str(config),
        *extra,
    ]


def test_command_line_refuses_bad_files_with_a_message(tmp_path):
    files = crafted_files(tmp_path)
    script = load_script()
    for name, path in files.items():
        output = tmp_path / f"out_{name}"
        with pytest.raises(SystemExit) as refusal:
            script.main(conversion_command(path, output)[2:])
        assert EXPECTED_ERRORS[name] in str(refusal.value.code), name
        assert not output.exists(), name
    # As a process: status 1 and the message, no traceback (one run: each process pays the imports).
    run = subprocess.run(
        conversion_command(files["truncated"], tmp_path / "out"), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 1 and EXPECTED_ERRORS["truncated"] in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def load_script():
    spec = importlib.util.spec_from_file_location("convert_original_checkpoint", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its argument dataclasses look their module up
    spec.loader.exec_module(script)
    return script


def test_command_line_writes_a_partial_model_only_on_request(tmp_path, capsys):
    files = crafted_files(tmp_path)
    script = load_script()
    output = tmp_path / "partial_model"
    with pytest.raises(SystemExit, match="nothing written"):
        script.main(conversion_command(files["partial"], output)[2:])
    assert not output.exists()
    script.main(conversion_command(files["partial"], output, "--allow_partial")[2:])
    assert "MISSING vision_model.post_layernorm.weight" in capsys.readouterr().out
    assert BlipForConditionalGeneration.from_pretrained(output).vision_model.post_layernorm.weight.shape == (32,)
