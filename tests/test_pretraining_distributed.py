"""Two CPU processes (gloo) against one process on the concatenated batch: global ITC keys, the queues, and ITM
negatives drawn from the other rank. The ranks run tests/dist_pretraining.py under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_pretraining import GLOBAL_BATCH, make_batch, make_model, trainable_gradients

SCRIPT = Path(__file__).with_name("dist_pretraining.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saw."""
    output_dir = tmp_path_factory.mktemp("dist_pretraining")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPT), str(output_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(output_dir / f"rank{rank}.pt") for rank in range(2)]


def test_global_keys_make_two_ranks_equal_one_process_on_the_whole_batch(ranks):
    model = make_model(itc_global_keys=True, queue_size=0)
    output = model(**make_batch())
    (output.loss_itc + 0.0 * (output.loss_itm + output.loss_lm)).backward()
    expected_grads = trainable_gradients(model)

    mean_rank_loss = (ranks[0]["global_keys"]["loss_itc"] + ranks[1]["global_keys"]["loss_itc"]) / 2
    torch.testing.assert_close(mean_rank_loss, output.loss_itc.detach(), rtol=0, atol=1e-5)
    # Each rank alone sees only its half of the batch: its loss is not the global one.
    assert abs(ranks[0]["global_keys"]["loss_itc"] - output.loss_itc.detach()) > 1e-4
    for rank in ranks:
        assert rank["global_keys"]["grads"].keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(rank["global_keys"]["grads"][name], grad, rtol=0, atol=1e-5, msg=name)


def test_queues_hold_both_ranks_features_in_rank_order(ranks):
    model = make_model(queue_size=16)
    model(**make_batch(image_ids=[3, 5, 7, 9]))
    for rank in ranks:
        for name in ("image_queue", "text_queue"):
            torch.testing.assert_close(rank["queue"][name], getattr(model, name), rtol=0, atol=1e-5)
        assert rank["queue"]["idx_queue"][0, :GLOBAL_BATCH].tolist() == [3, 5, 7, 9]
        assert int(rank["queue"]["queue_ptr"]) == GLOBAL_BATCH


def test_uneven_batches_across_ranks_are_gathered(ranks):
    # Rank 0 held 3 pairs and rank 1 one; both also backpropagated through negatives drawn from all ranks.
    model = make_model(queue_size=16)
    model(**make_batch(image_ids=[3, 5, 7, 9]))
    for rank in ranks:
        torch.testing.assert_close(rank["uneven_queue"]["image_queue"], model.image_queue, rtol=0, atol=1e-5)
        assert int(rank["uneven_queue"]["queue_ptr"]) == GLOBAL_BATCH
    assert ranks[0]["uneven_queue"]["negative_image_indices"].shape == (3,)
    assert ranks[1]["uneven_queue"]["negative_image_indices"].tolist()[0] in (0, 1, 2)  # rank 1's only negatives


def test_negative_all_rank_draws_rank_0s_negatives_from_rank_1(ranks):
    # Rank 0's two pairs show the same image, so all its negatives must come from rank 1 (pool rows 2 and 3).
    all_rank = ranks[0]["negatives_all_rank"]
    assert set(all_rank["negative_image_indices"].tolist()) <= {2, 3}
    assert set(all_rank["negative_text_indices"].tolist()) <= {2, 3}
    # Rank 1 backpropagated nothing of its own, yet its ViT has a gradient: rank 0's loss reached it through the
    # gathered image embeddings.
    assert ranks[1]["negatives_all_rank"]["vision_grad_norm"] > 0
    # Without the option each rank keeps to its own batch, and rank 1's ViT gets nothing.
    local = ranks[0]["negatives_local"]
    assert set(local["negative_image_indices"].tolist()) <= {0, 1}
    assert ranks[1]["negatives_local"]["vision_grad_norm"] == 0
