"""The same pretrain.py command gives the same weights: two runs under `--full_determinism`, with DataLoader workers,
stochastic depth and a checkpointed ViT block, end with every tensor bit-identical (docs/pretraining.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_vocab
from safetensors.torch import load_file

SCRIPT = Path(__file__).parents[1] / "training_scripts" / "pretrain.py"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("determinism")
    # A vocabulary file: WordPiece trained on the fly numbers its tokens differently from one run to the next.
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_vocab()) + "\n")
    arguments = [
        "--image_size", "32", "--synthetic_num_human", "16", "--synthetic_num_web", "16", "--synthetic_num_test", "4",
        "--vocab_file", str(vocab_file), "--max_steps", "6", "--per_device_train_batch_size", "8",
        "--logging_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu",
        "--dataloader_num_workers", "1", "--drop_path_rate", "0.2", "--vision_gradient_checkpointing_layers", "2",
        "--full_determinism", "--seed", "3",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    outputs = [root / "first", root / "second"]
    # Side by side: the runs share nothing but the command.
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), "--output_dir", str(output), *arguments],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for output in outputs
    ]
    for process in processes:
        log, _ = process.communicate(timeout=300)
        assert process.returncode == 0, log[-3000:]
    return outputs


def test_two_runs_of_the_same_command_end_bit_identical(two_runs):
    first, second = (load_file(output / "model.safetensors") for output in two_runs)
    assert first.keys() == second.keys() and len(first) > 300
    different = [name for name in first if not first[name].equal(second[name])]
    assert different == []
    first_losses, second_losses = (
        [entry["loss"] for entry in json.loads((output / "trainer_state.json").read_text())["log_history"][:-1]]
        for output in two_runs
    )
    assert len(first_losses) == 3 and first_losses == second_losses


def test_the_vision_flags_reach_the_saved_config(two_runs):
    vision_config = json.loads((two_runs[0] / "config.json").read_text())["vision_config"]
    assert vision_config["drop_path_rate"] == 0.2
    assert vision_config["gradient_checkpointing_layers"] == 2
