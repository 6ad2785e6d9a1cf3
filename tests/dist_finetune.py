"""Two-process fine-tuning scripts, launched by tests/test_finetune_distributed.py:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist_finetune.py MODELS_DIR OUTPUT_DIR

Each rank runs training_scripts/finetune_vqa.py and finetune_nlvr.py (a few steps from the tiny models saved in
MODELS_DIR, evaluation split across the ranks), then finetune_caption.py evaluating its captioner only, and writes
OUTPUT_DIR/rank{r}.json: the metrics each `main` returned and, for every evaluation call, the samples the rank
predicted itself (VQA question ids; NLVR2 pairs as image ids and statement; images as result ids). The arguments of
the runs are here, for the test to evaluate the same weights in one process.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from transformers_blip.training import captioning, nlvr, vqa

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
# Odd split sizes, so that the ranks' shares differ in size and a padded sampler would have repeated a sample.
VQA_DATA = ["--synthetic_num_vqa", "32", "--synthetic_num_vqa_test", "7", "--validation_share", "0.3"]
NLVR_DATA = ["--synthetic_num_nlvr", "16", "--synthetic_num_nlvr_test", "7", "--validation_share", "0.3"]
COMMON = ["--image_size", "32", "--disable_tqdm", "true", "--report_to", "none", "--randaugment", "false"]
CAPTION_DATA = ["--synthetic_num_human", "1", "--synthetic_num_val", "5", "--synthetic_num_test", "3"]
TRAINING = ["--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"]
TASKS = {"vqa": "finetune_vqa", "nlvr": "finetune_nlvr", "caption": "finetune_caption"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its argument dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def task_arguments(task: str, model_dir: Path) -> list[str]:
    """The arguments both the two-process run and the one-process check give the task's script."""
    if task == "caption":  # evaluation only: beam search is the slow part
        data = [*CAPTION_DATA, "--max_length", "8", "--min_length", "3", "--dataloader_num_workers", "0"]
    else:
        data = VQA_DATA + ["--k_test", "6"] if task == "vqa" else NLVR_DATA
    return ["--model_name_or_path", str(model_dir), *COMMON, *data, "--per_device_eval_batch_size", "3"]


def main(models_dir: str, output_dir: str) -> None:
    calls: dict[str, list] = {task: [] for task in TASKS}
    answer_questions = vqa.AnswerPredictor._answer_questions
    vqa.AnswerPredictor._answer_questions = lambda self, model, share: (
        calls["vqa"].append([int(qid) for qid in share["question_id"]]) or answer_questions(self, model, share)
    )
    classify = nlvr._classify
    nlvr._classify = lambda model, share, *args: (
        calls["nlvr"].append([[a, b, s] for a, b, s in zip(share["image0_id"], share["image1_id"], share["sentence"])])
        or classify(model, share, *args)
    )
    caption_rows = captioning.CaptionEvaluation._caption_rows
    captioning.CaptionEvaluation._caption_rows = lambda self, model, share: (
        calls["caption"].append(list(share["result_id"])) or caption_rows(self, model, share)
    )
    metrics = {}
    for task, script in TASKS.items():
        arguments = ["--output_dir", str(Path(output_dir, task)), *task_arguments(task, Path(models_dir, task))]
        arguments += ["--do_train", "false"] if task == "caption" else TRAINING
        metrics[task] = load_script(script).main(arguments)
    rank = torch.distributed.get_rank()
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps({"metrics": metrics, "calls": calls}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
