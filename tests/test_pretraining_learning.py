"""Pretraining a tiny BLIP on the synthetic benchmark with training_scripts/pretrain.py, on the CPU, for a few
minutes: every loss drops clearly and held-out ITC retrieval beats chance by far. The run is the session's shared
`pretrained_tiny` (conftest.py, learning_runs.py), which the fine-tuning learning tests start from; docs/results.md
has the figures."""

from __future__ import annotations

import json

from learning_runs import PRETRAINING_STEPS


def test_pretraining_learns_the_synthetic_benchmark(pretrained_tiny):
    history = json.loads((pretrained_tiny / "trainer_state.json").read_text())["log_history"]
    logs = [entry for entry in history if "loss_itc" in entry]
    first, last = logs[0], logs[-1]  # means over the first and the last 100 steps
    recall = json.loads((pretrained_tiny / "held_out_results.json").read_text())
    print(
        f"\nlosses, steps 1-100 -> {PRETRAINING_STEPS - 99}-{PRETRAINING_STEPS}:",
        {name: (first[name], last[name]) for name in ("loss_itc", "loss_itm", "loss_lm")},
    )
    print("held-out recall (%):", recall)

    assert last["loss_itc"] < 0.7 * first["loss_itc"]
    assert last["loss_lm"] < 0.6 * first["loss_lm"]
    # ITM scores one positive and two negatives per pair: with no information the best loss is the entropy of 1/3,
    # 0.6365 nats, where ITM sits until the model starts to tell matched pairs (after 1,000 to 1,300 steps here).
    assert last["loss_itm"] < 0.58
    # 100 held-out images with 5 captions each: chance is 1% either way.
    assert recall["txt_r1"] >= 10 * recall["chance_r1"]
    assert recall["img_r1"] >= 10 * recall["chance_r1"]
