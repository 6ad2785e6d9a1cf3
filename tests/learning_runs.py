"""The runs behind the learning tests: the tiny pretraining they share (done once per test session by the
`pretrained_tiny` fixture of conftest.py) and a way to run a training script as a subprocess with its own threads.
docs/results.md shows the same commands and their figures."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
PRETRAINING_STEPS = 2000


def pretraining_command(output_dir: Path) -> list[str]:
    """training_scripts/pretrain.py on the synthetic benchmark: the tiny size at 48 px, 2,000 steps of 16 pairs."""
    return [
        sys.executable, str(SCRIPTS / "pretrain.py"), "--output_dir", str(output_dir), "--model_size", "tiny",
        "--image_size", "48", "--synthetic_num_human", "1000", "--synthetic_num_web", "2000",
        "--synthetic_num_test", "100", "--max_steps", str(PRETRAINING_STEPS), "--per_device_train_batch_size", "16",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "50",
        "--adam_beta2", "0.98", "--min_crop_scale", "1.0", "--randaugment", "false", "--logging_steps", "100",
        "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "--seed", "0", "--full_determinism",
    ]  # fmt: skip


def script_environment(threads: int) -> dict[str, str]:
    """The environment of a script run on `threads` torch threads, its warnings silenced (the log is read back)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}


def start_script(command: Sequence[str], threads: int, log: Path) -> subprocess.Popen:
    """Starts `command` with stdout and stderr going to `log`; `finish_script` waits for it."""
    with open(log, "w") as log_file:  # the child holds its own copy of the descriptor
        return subprocess.Popen(list(command), env=script_environment(threads), stdout=log_file, stderr=log_file)


def finish_script(process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Waits for a started script; a failure or a run past `timeout` seconds raises with the end of its log."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"{process.args[1]} ran past {timeout:.0f} s:\n{log.read_text()[-3000:]}") from None
    if process.returncode != 0:
        raise RuntimeError(f"{process.args[1]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")


def pretrain_tiny(output_dir: Path, threads: int = 2, timeout: float = 900) -> Path:
    """Runs `pretraining_command` into `output_dir` (the model, its tokenizer, `trainer_state.json` and
    `held_out_results.json`) and returns it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    log = output_dir / "pretraining.log"
    finish_script(start_script(pretraining_command(output_dir), threads, log), log, timeout)
    return output_dir
