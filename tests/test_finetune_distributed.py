"""finetune_vqa.py and finetune_nlvr.py (training a few steps) and finetune_caption.py (evaluation only) as two CPU
processes (gloo, under torchrun): every evaluation sample is predicted once, by one rank; every rank reports the same
metrics; and they equal one process's evaluation of the same weights. The ranks run tests/dist_finetune.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_tokenizer
from dist_finetune import load_script, task_arguments

from transformers_blip.modeling_blip import BlipForConditionalGeneration, BlipForQuestionAnswering
from transformers_blip.modeling_nlvr import BlipForVisualReasoning
from transformers_blip.training.captioning import load_caption_splits
from transformers_blip.training.nlvr import load_nlvr_splits
from transformers_blip.training.vqa import load_vqa_splits

RUNNER = Path(__file__).with_name("dist_finetune.py")
SEED = 42  # TrainingArguments' default seed, which draws the held-out validation split
MODELS = {"vqa": BlipForQuestionAnswering, "nlvr": BlipForVisualReasoning, "caption": BlipForConditionalGeneration}
RESULT_FILES = {"vqa": ["vqa_result.json"], "nlvr": ["nlvr_result.json"], "caption": ["val_results.json",
                "test_results.json"]}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The tiny models both ranks start from, the runs' outputs, and what each rank recorded."""
    root = tmp_path_factory.mktemp("finetune_distributed")
    for task, model_class in MODELS.items():
        torch.manual_seed(0)
        model_class(make_config()).save_pretrained(root / "models" / task)
        make_tokenizer().save_pretrained(root / "models" / task)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = os.pathsep.join([str(RUNNER.parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUNNER)]
    result = subprocess.run(
        [*command, str(root / "models"), str(root / "out")], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((root / "out" / f"rank{rank}.json").read_text()) for rank in range(2)]
    return {"root": root, "ranks": ranks}


def evaluation_splits(task: str) -> list[list]:
    """The samples of the validation and test splits of the runs, in the order they are evaluated."""
    if task == "caption":
        kwargs = {"seed": 0, "image_size": 32, "num_human": 1, "num_val": 5, "num_test": 3}
        _, val, test = load_caption_splits("synthetic", synthetic_kwargs=kwargs, with_train=False)
        return [val["image_id"], test["image_id"]]
    if task == "vqa":
        kwargs = {"image_size": 32, "num_vqa": 32, "num_vqa_test": 7}
        splits = load_vqa_splits("synthetic", validation_share=0.3, seed=SEED, synthetic_kwargs=kwargs)
        return [[int(qid) for qid in splits[name]["question_id"]] for name in ("validation", "test")]
    kwargs = {"image_size": 32, "num_nlvr": 16, "num_nlvr_test": 7}
    splits = load_nlvr_splits("synthetic", validation_share=0.3, seed=SEED, synthetic_kwargs=kwargs)
    columns = ("image0_id", "image1_id", "sentence")
    return [[list(row) for row in zip(*(splits[name][c] for c in columns))] for name in ("validation", "test")]


@pytest.mark.parametrize("task", list(MODELS))
def test_every_evaluation_sample_is_predicted_once_by_one_rank(runs, task):
    calls = [rank["calls"][task] for rank in runs["ranks"]]
    expected = evaluation_splits(task)
    assert len(calls[0]) == len(calls[1]) == len(expected) == 2  # the validation split, then the test split
    for split, rank0, rank1 in zip(expected, *calls):
        assert rank0 and rank1  # both ranks took a share
        predicted = Counter(map(json.dumps, rank0 + rank1))
        assert predicted == Counter(map(json.dumps, split))  # each sample once: no repeats from sampler padding


@pytest.mark.parametrize("task", list(MODELS))
def test_every_rank_reports_what_one_process_measures_on_the_same_weights(runs, task, tmp_path):
    metrics = [rank["metrics"][task] for rank in runs["ranks"]]
    assert metrics[0] == metrics[1]
    output = runs["root"] / "out" / task
    # The weights the two processes ended with (VQA, NLVR2: trained and saved; captioning: evaluated as loaded).
    weights = runs["root"] / "models" / "caption" if task == "caption" else output
    script = load_script({"vqa": "finetune_vqa", "nlvr": "finetune_nlvr", "caption": "finetune_caption"}[task])
    alone = script.main(["--output_dir", str(tmp_path), *task_arguments(task, weights), "--do_train", "false"])
    assert alone["evaluated"] == str(weights)
    if task == "caption":
        assert alone == metrics[0] and {"CIDEr", "Bleu_4"} <= set(alone["test"])
    else:
        for name in ("validation_accuracy", "test_accuracy"):
            assert alone[name] == pytest.approx(metrics[0][name], abs=1e-9), name
    for result_file in RESULT_FILES[task]:
        assert json.loads((tmp_path / result_file).read_text()) == json.loads((output / result_file).read_text())
