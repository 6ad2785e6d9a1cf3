"""Pretraining under transformers' Trainer: the collator, one momentum step per optimizer step under gradient
accumulation, the separate loss logs, exact resumption, and the script's documented arguments."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import WORDS, make_config, make_tokenizer, random_image
from datasets import Dataset
from transformers import TrainerCallback, TrainingArguments

from transformers_blip.data import BlipEvalTransform, DecodeImages, SkipReport
from transformers_blip.modeling_pretraining import BlipForPreTraining
from transformers_blip.training import (
    BlipPreTrainingTrainer,
    DecodingCollator,
    ImageTextCollator,
    MomentumUpdateCallback,
    check_processes_train_together,
    with_caption_lengths,
)
from transformers_blip.training.checkpoints import verify_checkpoint

SCRIPT = Path(__file__).parents[1] / "training_scripts" / "pretrain.py"


def make_pairs(count: int = 12) -> Dataset:
    """Random images with short captions from the tiny vocabulary; image i appears twice (ids 0, 0, 1, 1, ...)."""
    generator = torch.Generator().manual_seed(0)
    captions = [
        " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (5,), generator=generator)) for _ in range(count)
    ]
    images = [random_image(i // 2, size=(32, 32)) for i in range(count)]
    return Dataset.from_dict({"image": images, "caption": captions, "image_id": [i // 2 for i in range(count)]})


def make_model() -> BlipForPreTraining:
    torch.manual_seed(0)
    config = make_config(queue_size=16, alpha_warmup_steps=4, momentum=0.9)
    config.text_config.hidden_dropout_prob = 0.1  # dropout draws random numbers: resuming must restore them too
    return BlipForPreTraining(config)


def make_trainer(
    output_dir, max_steps: int, save_steps: int = 100, callbacks=(), **overrides
) -> BlipPreTrainingTrainer:
    settings = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "report_to": "none",
        "use_cpu": True,
        "remove_unused_columns": False,
        "disable_tqdm": True,
        "seed": 0,
        **overrides,
    }
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, **settings)
    collator = ImageTextCollator(make_tokenizer(), BlipEvalTransform(32), max_length=8)
    return BlipPreTrainingTrainer(
        model=make_model(), args=args, train_dataset=make_pairs(), data_collator=collator, callbacks=list(callbacks)
    )


def test_collator_tokenizes_to_a_fixed_length_and_passes_image_ids():
    collator = ImageTextCollator(make_tokenizer(), BlipEvalTransform(32), max_length=10, image_id_column="image_id")
    rows = [
        {"image": random_image(0), "caption": "A Red square!", "image_id": 4},
        {"image": random_image(1), "caption": "blue", "image_id": 9},
    ]
    batch = collator(rows)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == (2, 10) and batch["attention_mask"].shape == (2, 10)
    assert batch["image_ids"].tolist() == [4, 9]
    assert make_tokenizer().decode(batch["input_ids"][0], skip_special_tokens=True) == "a red square"  # cleaned
    # Rows that already hold tensors (decoded by `DecodeImages`) are used as they are.
    tensors = [{"image": torch.zeros(3, 32, 32), "caption": "red"}]
    assert ImageTextCollator(make_tokenizer(), None)(tensors)["pixel_values"].abs().sum() == 0


def test_decoding_collator_drops_broken_images_and_pads_to_the_batchs_longest_caption(tmp_path):
    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    random_image(0).save(good)
    broken.write_bytes(b"not a png")
    rows = [
        {"image": str(good), "caption": "red"},
        {"image": str(broken), "caption": "blue square"},
        {"image": str(good), "caption": "a big green circle"},
    ]
    report = SkipReport(tmp_path / "skips")
    tokenize = ImageTextCollator(make_tokenizer(), None, max_length=30, padding="longest")
    batch = DecodingCollator(DecodeImages(BlipEvalTransform(32), report=report), tokenize)(rows)

    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == (2, 6)  # [CLS] a big green circle [SEP]; not padded to 30
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 6]
    assert sum(report.counts().values()) == 1 and report.skipped[0].source == str(broken)
    with pytest.raises(ValueError, match="padding"):
        ImageTextCollator(make_tokenizer(), None, padding="do_not_pad")


def test_a_batch_of_unreadable_images_is_passed_over_on_one_process(tmp_path):
    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    random_image(0, size=(32, 32)).save(good)
    broken.write_bytes(b"not a png")
    paths = [str(broken)] * 2 + [str(good)] * 4  # read in order: the first batch of two has nothing left
    pairs = Dataset.from_dict({"image": paths, "caption": ["red square", "blue circle", "a big green circle"] * 2})
    report = SkipReport(tmp_path / "skips")
    collator = DecodingCollator(
        DecodeImages(BlipEvalTransform(32), report=report), ImageTextCollator(make_tokenizer(), None, max_length=8)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=2, num_train_epochs=1, report_to="none",
        use_cpu=True, remove_unused_columns=False, train_sampling_strategy="sequential", save_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = BlipPreTrainingTrainer(model=make_model(), args=args, train_dataset=pairs, data_collator=collator)
    trainer.train()

    assert trainer.empty_batches == 1
    assert trainer.state.global_step == 2  # the two batches that hold images
    assert sum(report.counts().values()) == 2


def test_caption_lengths_count_words():
    pairs = with_caption_lengths(Dataset.from_dict({"caption": ["red", "a big green circle"]}))
    assert pairs["length"] == [1, 4]


class CountMomentumUpdates(TrainerCallback):
    """Counts the momentum updates by wrapping the model's method when training starts."""

    def __init__(self):
        self.count = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        update = model._momentum_update

        def counted():
            self.count += 1
            update()

        model._momentum_update = counted


def test_momentum_moves_once_per_optimizer_step_and_alpha_follows_the_global_step(tmp_path):
    counter = CountMomentumUpdates()
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[counter])
    momentum_before = trainer.model.text_proj_m.weight.clone()
    trainer.train()
    model = trainer.model
    assert counter.count == 3  # 3 optimizer steps of 2 micro-batches each
    assert model.optimizer_steps == 3 and model.distillation_alpha() == pytest.approx(0.4 * 3 / 4)
    assert not torch.equal(model.text_proj_m.weight, momentum_before)
    assert int(model.queue_ptr) == 12  # every micro-batch enqueues its 2 pairs
    assert sum(isinstance(callback, MomentumUpdateCallback) for callback in trainer.callback_handler.callbacks) == 1


def test_each_loss_is_logged(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"loss_itc", "loss_itm", "loss_lm", "alpha", "temperature"} <= entry.keys()
        assert entry["loss"] == pytest.approx(entry["loss_itc"] + entry["loss_itm"] + entry["loss_lm"], abs=1e-3)
    assert logs[0]["alpha"] == pytest.approx(0.1)  # logged after the first step: alpha ramps over 4 steps


class StopAt(TrainerCallback):
    """Interrupts training after `step` optimizer steps (the checkpoint at that step is written first)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_resuming_from_a_checkpoint_continues_exactly(tmp_path):
    steps = 4  # 2 epochs of 12 pairs at 2 x 2 per step... the queue wraps and alpha ramps through the resume
    uninterrupted = make_trainer(tmp_path / "straight", max_steps=2 * steps)
    uninterrupted.train()

    interrupted = make_trainer(tmp_path / "resumed", max_steps=2 * steps, save_steps=steps, callbacks=[StopAt(steps)])
    interrupted.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{steps}"
    assert interrupted.state.global_step == steps and checkpoint.is_dir()
    resumed = make_trainer(tmp_path / "resumed", max_steps=2 * steps, save_steps=steps)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == 2 * steps
    expected = uninterrupted.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():  # weights, momentum copies, queues, pointer
        assert (tensor.float() - expected[name].float()).abs().max() <= 1e-6, name
    assert resumed.model.optimizer_steps == uninterrupted.model.optimizer_steps == 2 * steps


def test_script_resumes_from_the_newest_complete_checkpoint_and_names_a_damaged_one(tmp_path):
    command = [
        sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--image_size", "32",
        "--synthetic_num_human", "4", "--synthetic_num_web", "4", "--synthetic_num_test", "4", "--vocab_size", "200",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "1",
        "--disable_tqdm", "true", "--use_cpu",
    ]  # fmt: skip

    def run(*arguments):
        return subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=300)

    first = run("--max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    with open(weights, "r+b") as handle:  # the tail of the newest checkpoint's weights zeroed, its size kept
        handle.seek(weights.stat().st_size // 2)
        handle.write(bytes(weights.stat().st_size - weights.stat().st_size // 2))

    refused = run("--max_steps", "3", "--resume_from_checkpoint", str(weights.parent))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"error: {weights} differs" in refused.stderr

    resumed = run("--max_steps", "3", "--resume_from_checkpoint")  # alone: the newest complete checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Passing over checkpoint-2" in resumed.stderr
    assert "missing keys" not in resumed.stderr  # the decoder's tied tensors are stored once, not missing
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]  # step 2 redone
    verify_checkpoint(weights.parent)  # the damaged checkpoint-2 was replaced by the resumed run's own


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_script_help_documents_every_argument():
    script = load_script()
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    for arguments in (script.ModelArguments, script.DataArguments):
        for field in dataclasses.fields(arguments):
            assert f"--{field.name}" in help_text
            assert field.metadata.get("help"), f"{field.name} has no help"
            assert " ".join(field.metadata["help"].split())[:40] in help_text
    for launcher in ("torchrun", "accelerate launch"):
        assert launcher in script.__doc__


def test_script_pretrains_with_batches_of_similar_caption_length(tmp_path):
    command = [
        sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--image_size", "32",
        "--synthetic_num_human", "8", "--synthetic_num_web", "8", "--synthetic_num_test", "4", "--vocab_size", "200",
        "--max_steps", "2", "--per_device_train_batch_size", "4", "--train_sampling_strategy", "group_by_length",
        "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert all(name in state["log_history"][0] for name in ("loss_itc", "loss_itm", "loss_lm"))
    recall = json.loads((tmp_path / "held_out_results.json").read_text())
    assert recall["chance_r1"] == 25.0  # 4 held-out images


def test_script_trains_two_processes_together_under_accelerate_launch(tmp_path):
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
    ]  # fmt: skip
    arguments = [
        "--output_dir", str(tmp_path), "--image_size", "32", "--synthetic_num_human", "8", "--synthetic_num_web", "8",
        "--synthetic_num_test", "4", "--vocab_size", "200", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1",
        "--disable_tqdm", "true", "--queue_size", "16", "--itc_global_keys", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, str(SCRIPT), *arguments], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    state = json.loads((tmp_path / "trainer_state.json").read_text())
    # 8 x 5 clean + 8 web = 48 pairs; 2 processes x 4 = 8 pairs per step: 3 steps are half an epoch (one process
    # alone would have covered a quarter).
    assert state["global_step"] == 3 and state["epoch"] == pytest.approx(0.5)
    for entry in state["log_history"]:
        if "loss_itc" in entry:  # the loss is the sum of the three means, not scaled by the number of processes
            assert entry["loss"] == pytest.approx(entry["loss_itc"] + entry["loss_itm"] + entry["loss_lm"], abs=2e-3)
    assert result.stdout.count("held_out metrics") == 1  # evaluated and reported by the main process only
    # Both ranks wrote their RNG state before each checkpoint was sealed; rotation kept the last one (of the final
    # step, which Trainer saves too), and deleted checkpoint-2 whole.
    assert sorted(path.name for path in tmp_path.iterdir() if "checkpoint" in path.name) == ["checkpoint-3"]
    verify_checkpoint(tmp_path / "checkpoint-3")
    sealed = json.loads((tmp_path / "checkpoint-3" / "checkpoint_manifest.json").read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "model.safetensors"} <= sealed.keys()


def test_a_launch_that_trainer_would_not_join_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="--use_cpu"):
        check_processes_train_together(SimpleNamespace(world_size=1))
    check_processes_train_together(SimpleNamespace(world_size=2))
