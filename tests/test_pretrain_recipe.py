"""pretrain.py as the paper runs it: `--recipe` presets, BLIP's learning-rate schedule at every step (also after a
resume), and a start from a ViT and a BERT that transformers' own classes saved."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image, tiny_vocab
from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, ViTConfig, ViTModel

SCRIPT = Path(__file__).parents[1] / "training_scripts" / "pretrain.py"
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)  # MODEL_SIZES["tiny"]


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(script)
    return script


def test_recipe_sets_the_originals_values_and_the_command_line_wins(monkeypatch):
    from transformers_blip.training import parse_with_recipe

    parser = load_script(monkeypatch).build_parser()
    model, _, optimization, training = parse_with_recipe(
        parser, ["--recipe", "pretrain_base", "--output_dir", "run", "--num_train_epochs", "3"]
    )
    assert (model.model_size, model.image_size, model.queue_size, model.alpha) == ("base", 224, 57600, 0.4)
    assert (training.learning_rate, training.weight_decay, training.max_grad_norm) == (3e-4, 0.05, 0.0)
    assert (training.per_device_train_batch_size, training.warmup_steps) == (75, 3000)
    assert (optimization.lr_schedule, optimization.min_lr, optimization.warmup_lr) == (
        "step_decay_with_warmup",
        1e-6,
        1e-6,
    )
    assert (optimization.lr_decay_rate, optimization.weight_decay_all) == (0.9, True)
    assert training.num_train_epochs == 3  # given: wins over the preset's 20
    model, _, _, training = parse_with_recipe(parser, ["--recipe", "pretrain_large", "--output_dir", "run"])
    assert (model.model_size, training.learning_rate) == ("large", 2e-4)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("encoders")
    ViTModel(
        ViTConfig(image_size=32, patch_size=8, layer_norm_eps=1e-6, **TINY), add_pooling_layer=False
    ).save_pretrained(root / "vit")
    bert = BertForMaskedLM(BertConfig(vocab_size=126, max_position_embeddings=64, **TINY))
    bert.save_pretrained(root / "bert")
    BertTokenizerFast(vocab={token: i for i, token in enumerate(tiny_vocab()[:126])}).save_pretrained(root / "bert")
    words = "a picture of photo red blue green yellow square circle triangle small big left right".split()
    (root / "data").mkdir()
    records = []
    for index in range(8):
        random_image(index, size=(32, 32)).save(root / "data" / f"{index}.png")
        records.append({"image": f"{index}.png", "caption": " ".join(words[index : index + 4])})
    (root / "data" / "pairs.json").write_text(json.dumps(records))
    return root


def blip_pretraining_rate(step, steps_per_epoch, init_lr, warmup_lr, warmup_steps, decay, min_lr):
    """The original pretrain.py's rate at a step, from its two rules (utils.warmup_lr_schedule, step_lr_schedule)."""
    epoch, i = divmod(step, steps_per_epoch)
    if epoch == 0:
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)
    return max(min_lr, init_lr * decay**epoch)


def run(monkeypatch, encoders, output_dir, *extra):
    arguments = [
        "--recipe", "pretrain_base", "--model_size", "tiny", "--image_size", "32", "--queue_size", "0",
        "--per_device_train_batch_size", "4", "--num_train_epochs", "3", "--warmup_steps", "3",
        "--lr_decay_rate", "0.5", "--min_lr", "1e-4", "--logging_steps", "1", "--save_strategy", "steps",
        "--save_steps", "2", "--dataloader_num_workers", "0", "--disable_tqdm", "true", "--use_cpu",
        "--source", "caption_json", "--train_files", str(encoders / "data" / "pairs.json"),
        "--image_root", str(encoders / "data"), "--output_dir", str(output_dir),
        "--vision_model_name_or_path", str(encoders / "vit"), "--text_model_name_or_path", str(encoders / "bert"),
    ]  # fmt: skip
    script = load_script(monkeypatch)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *arguments, *extra])
    script.main()
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def test_pretraining_from_vit_and_bert_follows_blips_schedule_also_after_a_resume(monkeypatch, encoders, tmp_path):
    history = run(monkeypatch, encoders, tmp_path / "run")
    rates = [entry["learning_rate"] for entry in history if "learning_rate" in entry]
    expected = [blip_pretraining_rate(step, 2, 3e-4, 1e-6, 3, 0.5, 1e-4) for step in range(6)]
    assert rates == pytest.approx(expected, rel=1e-9)  # warm-up cut short by epoch 1, decay, then the floor
    report = json.loads((tmp_path / "run" / "pretrained_encoders_report.json").read_text())
    assert not report["missing"] and not report["dropped_unexpected"]
    assert "vision_model.encoder.layers.3.self_attn.qkv.weight" in report["loaded"]
    assert "text_encoder.encoder.layer.3.attention.self.query.weight" in report["loaded"]
    # A second run resumed from step 2 logs the same rates for steps 3 to 6.
    resumed = run(
        monkeypatch, encoders, tmp_path / "run", "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2")
    )
    resumed_rates = [entry["learning_rate"] for entry in resumed if "learning_rate" in entry]
    assert resumed_rates[-4:] == pytest.approx(expected[2:], rel=1e-9)
