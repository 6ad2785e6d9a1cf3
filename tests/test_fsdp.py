"""FSDP2 through Trainer and accelerate with the momentum encoders and queues intact: two CPU processes (gloo) train
the same losses and weights sharded as replicated under DDP, and a checkpoint saved under FSDP resumes to the same
end. The ranks run tests/dist_fsdp.py under torchrun; docs/pretraining.md says what FSDP needs of the model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("dist_fsdp.py")
STEPS = 4


def launch(output_dir: Path, mode: str, *arguments: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    result = subprocess.run(
        [*command, str(output_dir), mode, str(STEPS), *arguments], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(output_dir / "results.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("fsdp")
    ddp = launch(root / "ddp", "ddp")["run"]
    fsdp = launch(root / "fsdp", "fsdp", "--resume_at", str(STEPS // 2))
    return {"ddp": ddp, "fsdp": fsdp["run"], "resumed": fsdp["resumed"]}


def test_fsdp_shards_the_model_and_trains_the_losses_of_ddp(runs):
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    assert ddp["wrapped"] == "DistributedDataParallel" and fsdp["wrapped"].startswith("FSDP")
    assert sorted(fsdp["losses"]) == list(range(1, STEPS + 1))
    for step, losses in ddp["losses"].items():  # total, ITC, ITM, LM
        torch.testing.assert_close(fsdp["losses"][step], losses, rtol=0, atol=1e-4, msg=f"step {step}")


def test_fsdp_ends_with_the_weights_momentum_copies_and_queues_of_ddp(runs):
    ddp, fsdp = runs["ddp"]["state"], runs["fsdp"]["state"]
    assert fsdp.keys() == ddp.keys()
    for name, tensor in ddp.items():
        torch.testing.assert_close(fsdp[name], tensor, rtol=0, atol=1e-5, msg=name)
    # The momentum copies started equal to the online encoders and followed them by EMA: moved, but not equal.
    online, momentum = fsdp["vision_proj.weight"], fsdp["vision_proj_m.weight"]
    assert not torch.equal(online, momentum)
    # The queues hold this run's features: unit columns, written by both ranks each step (4 pairs per step).
    assert torch.allclose(fsdp["image_queue"].norm(dim=0), torch.ones(fsdp["image_queue"].shape[1]), atol=1e-5)
    assert int(fsdp["queue_ptr"]) == (STEPS * 4) % fsdp["image_queue"].shape[1]


def test_a_checkpoint_saved_under_fsdp_resumes_to_the_uninterrupted_end(runs):
    fsdp, resumed = runs["fsdp"], runs["resumed"]
    assert resumed["steps_taken"] == STEPS // 2  # it went on from the checkpoint, not from the start
    for step in range(STEPS // 2 + 1, STEPS + 1):
        torch.testing.assert_close(resumed["losses"][step], fsdp["losses"][step], rtol=0, atol=1e-6)
    for name, tensor in fsdp["state"].items():
        torch.testing.assert_close(resumed["state"][name], tensor, rtol=0, atol=1e-6, msg=name)
