"""VQA fine-tuning as the original's `train_vqa.py` does it: data, batches, answers, accuracy and the result file.

- Data: the synthetic benchmark's `vqa_train` / `vqa_test`, or BLIP's annotation JSON (`load_vqa`): VQA v2 train
  and val mixed with Visual Genome QA, whose one answer per question weighs 0.2 (`configs/vqa.yaml`'s
  `train_files`). The original trains on all of it and has no validation; to keep the best checkpoint by accuracy a
  run here validates on held-out images of the training split (`held_out_split`) or on files it is given.
- Batches (`VqaCollator`): every question's distinct answers one after the other, with their weights and counts,
  which is what `BlipForQuestionAnswering` needs for the original's loss, sum(weight x answer loss) / questions.
- Answers (`predict_answers`): generated (3 beams, at most 10 tokens) or ranked among a candidate list
  (`rank_answers`, k = 128), scored by the negated label-smoothed answer loss as the original does, or by the
  plain log-likelihood on request.
- The result file (`write_vqa_results`): `[{"question_id": int, "answer": str}]`, the evaluation server's format.

Under several processes each rank answers a contiguous share of a split and every rank gets all the answers
(`predict_in_shares`), so that the accuracy is the same on every rank and equal to one process's.

`held_out_split`, `start_task_model` and `write_run_summary` serve the NLVR2 script too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments

from ..atomic_writes import write_text_atomically
from ..benchmark import build_synthetic_benchmark
from ..convert.pretraining import task_head_from_pretraining
from ..data import MAX_WORDS, BlipEvalTransform, DecodeImages, SkipReport, load_vqa, vqa_answer_list
from ..data.hub_datasets import HubDatasetArguments, load_hub_splits
from ..evaluation.vqa_accuracy import vqa_accuracy
from ..modeling_blip import BlipPreTrainedModel
from ..processing_blip import text_config_token_kwargs
from .checkpoints import checkpoint_to_resume
from .finetuning import checkpoint_layout, predict_in_shares, training_regularisation
from .model_sizes import pretraining_config
from .vocabulary import run_vocabulary

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("rank", "generate")
# "answer_loss": the original's score, the negated training loss of the answer (label-smoothed, summed over tokens);
# "log_likelihood": the answer's exact log-probability.
RANK_SCORINGS = ("answer_loss", "log_likelihood")
# The original's question length (`blip_vqa.py` truncates questions to 35 tokens).
QUESTION_MAX_LENGTH = 35


# ----------------------------------------------------------------------------------------------------------- data
def held_out_split(
    dataset: Dataset, share: float, seed: int, group_column: str | None = None
) -> tuple[Dataset, Dataset]:
    """(kept, held out): `share` of the rows held out at random, whole groups at a time (e.g. all questions of an
    image, so that validation images are never trained on)."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"the held-out share must lie in (0, 1), got {share}")
    groups = dataset[group_column] if group_column is not None else list(range(len(dataset)))
    distinct = sorted(set(groups))
    count = max(1, round(share * len(distinct)))
    if count >= len(distinct):
        raise ValueError(f"holding out {share:.0%} of {len(distinct)} groups leaves nothing to train on")
    held = set(np.random.default_rng(seed).permutation(distinct)[:count].tolist())
    is_held = [group in held for group in groups]
    kept_rows = [index for index, flag in enumerate(is_held) if not flag]
    held_rows = [index for index, flag in enumerate(is_held) if flag]
    return dataset.select(kept_rows), dataset.select(held_rows)


def load_vqa_splits(
    source: str,
    train_files: Sequence[str] = (),
    validation_files: Sequence[str] = (),
    test_files: Sequence[str] = (),
    image_root: str | None = None,
    vg_image_root: str | None = None,
    validation_share: float = 0.0,
    seed: int = 0,
    synthetic_kwargs: dict[str, Any] | None = None,
    report: SkipReport | None = None,
    max_words: int = MAX_WORDS["vqa"],
    hub_arguments: HubDatasetArguments | None = None,
) -> dict[str, Dataset | None]:
    """`{"train", "validation", "test"}` of a VQA run; validation is `None` when there is none.

    `source="synthetic"` reads the benchmark's `vqa_train` and `vqa_test`; `"vqa_json"` reads BLIP's annotation
    files (`vqa_train.json`, `vqa_val.json`, `vg_qa.json`, ...; `vg_image_root` for the Visual Genome ones). Without
    validation files, `validation_share` of the training images are held out for validation (0: none). Questions
    of the JSON files keep `max_words` words. `"hub"` reads the `datasets` dataset of `hub_arguments`
    (`load_hub_splits`), held out of in the same way when it has no validation split.
    """
    if source == "hub":
        splits = load_hub_splits(hub_arguments, "vqa", max_words, report)
        train, validation, test = splits["train"], splits["validation"], splits["test"]
    elif source == "synthetic":
        benchmark = build_synthetic_benchmark(**_vqa_only(synthetic_kwargs or {}))
        train, validation, test = benchmark["vqa_train"], None, benchmark["vqa_test"]
    elif source == "vqa_json":
        if not train_files or not test_files:
            raise ValueError("the vqa_json source needs --train_files and --test_files (BLIP's annotation JSON)")
        if image_root is None:
            raise ValueError("the vqa_json source needs --image_root, where the COCO image paths start")

        def read(files: Sequence[str]) -> Dataset:
            return load_vqa(list(files), image_root, vg_image_root=vg_image_root, max_words=max_words, report=report)

        train, test = read(train_files), read(test_files)
        validation = read(validation_files) if validation_files else None
    else:
        raise ValueError(f"unknown VQA source {source!r}: synthetic or vqa_json")
    if validation is None and validation_share > 0:
        train, validation = _hold_out_vqa_questions(train, validation_share, seed)
    return {"train": train, "validation": validation, "test": test}


def _hold_out_vqa_questions(train: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation) with `share` of the questions that have several human answers held out, by image where
    the rows name it (the synthetic benchmark), else by question. A Visual Genome question (one answer) always
    trains: VQA accuracy leaves each annotator out in turn, so a single answer would score 0 whatever is predicted."""
    several = [index for index, answers in enumerate(train["answers"]) if len(answers) > 1]
    single = sorted(set(range(len(train))) - set(several))
    group = "image_id" if "image_id" in train.column_names else "question_id"
    kept, validation = held_out_split(train.select(several), share, seed, group_column=group)
    return concatenate_datasets([kept, train.select(single)]), validation


def _vqa_only(synthetic_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Benchmark arguments that build the VQA splits only (every other split empty or minimal)."""
    empty = {"num_human": 0, "num_web": 0, "num_val": 0, "num_test": 0, "num_nlvr": 1, "num_nlvr_test": 1}
    return {**empty, **synthetic_kwargs}


class VqaCollator:
    """Batches VQA rows (images already tensors) for [`BlipForQuestionAnswering`].

    Training rows give `unique_answers` and `answer_weights`; they are laid out question by question, as the
    model's `answer_counts` expects. Rows without answers (test questions) give the question and image only.

    Args:
        tokenizer: BLIP's tokenizer; the model puts `[ENC]` / `[DEC]` in place of `[CLS]` itself.
        question_max_length: questions are truncated to this many tokens.
        with_answers: batch the answers too (training).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        question_max_length: int = QUESTION_MAX_LENGTH,
        with_answers: bool = True,
    ):
        self.tokenizer = tokenizer
        self.question_max_length = question_max_length
        self.with_answers = with_answers

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        questions = self.tokenizer(
            [row["question"] for row in rows],
            padding="longest",
            truncation=True,
            max_length=self.question_max_length,
            return_tensors="pt",
        )
        batch = {
            "pixel_values": torch.stack([row["image"] for row in rows]),  # (B, 3, H, W)
            "input_ids": questions["input_ids"],  # (B, L_q)
            "attention_mask": questions["attention_mask"],
        }
        if not self.with_answers:
            return batch
        answers = [answer for row in rows for answer in row["unique_answers"]]
        if any(len(row["unique_answers"]) == 0 for row in rows):
            raise ValueError("a training question has no answer: test questions cannot be trained on")
        encoded = self.tokenizer(answers, padding="longest", return_tensors="pt")
        batch["answer_input_ids"] = encoded["input_ids"]  # (A, L_a), A = answers of all questions
        batch["answer_attention_mask"] = encoded["attention_mask"]
        weights = [weight for row in rows for weight in row["answer_weights"]]
        batch["answer_weights"] = torch.tensor(weights, dtype=torch.float)  # (A,)
        batch["answer_counts"] = torch.tensor([len(row["unique_answers"]) for row in rows])  # (B,)
        return batch


# -------------------------------------------------------------------------------------------------------- answers
@torch.no_grad()
def rank_answers(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    candidate_input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    candidate_attention_mask: torch.Tensor | None = None,
    k: int = 128,
    scoring: str = "answer_loss",
) -> torch.LongTensor:
    """Index (B,) of each question's answer among the candidates, as the original's `rank_answer`: keep the `k`
    candidates whose first token is most probable, score each in full, return the best.

    `scoring="answer_loss"` scores a candidate by minus its label-smoothed training loss, as the original does;
    `"log_likelihood"` by its exact log-probability (what `BlipForQuestionAnswering.rank` returns).
    """
    if scoring not in RANK_SCORINGS:
        raise ValueError(f"scoring must be one of {RANK_SCORINGS}, got {scoring!r}")
    smoothing = model.text_decoder.config.label_smoothing if scoring == "answer_loss" else 0.0
    ranking = model.rank(
        input_ids, pixel_values, candidate_input_ids, attention_mask, candidate_attention_mask, k=k,
        label_smoothing=smoothing,
    )  # fmt: skip
    return ranking.answer_index


class AnswerPredictor:
    """`{question_id: answer}` for the questions of a dataset, generated or ranked among `candidates`.

    Args:
        tokenizer: BLIP's tokenizer.
        image_size: evaluation images are resized to it (the original's 480 for VQA).
        inference: `"rank"` (the original's default) or `"generate"`.
        candidates: the candidate answers of `"rank"` (BLIP's `answer_list.json`, or `vqa_answer_list`).
        k: candidates scored in full per question.
        scoring: see `rank_answers`.
        batch_size: questions per forward pass.
        generate_kwargs: overrides of the model's generation settings (3 beams, at most 10 tokens).
        report: where undecodable images are counted; their questions are answered with "" so that the result
            file still holds every question.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        inference: str = "rank",
        candidates: Sequence[str] = (),
        k: int = 128,
        scoring: str = "answer_loss",
        batch_size: int = 32,
        generate_kwargs: dict[str, Any] | None = None,
        report: SkipReport | None = None,
    ):
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference must be one of {INFERENCE_MODES}, got {inference!r}")
        if inference == "rank" and not candidates:
            raise ValueError("rank inference needs a candidate answer list")
        if scoring not in RANK_SCORINGS:
            raise ValueError(f"scoring must be one of {RANK_SCORINGS}, got {scoring!r}")
        self.tokenizer = tokenizer
        self.inference = inference
        self.candidates = list(candidates)
        self.k = k
        self.scoring = scoring
        self.batch_size = batch_size
        self.generate_kwargs = generate_kwargs or {}
        self.decode = DecodeImages(BlipEvalTransform(image_size), report=report)
        self.collate = VqaCollator(tokenizer, with_answers=False)

    def __call__(self, model, dataset: Dataset) -> dict[int, str]:
        """`{question_id: answer}` for every question of `dataset`; under several processes each rank answers its
        share and all get every answer."""
        return dict(predict_in_shares(lambda share: list(self._answer_questions(model, share).items()), dataset))

    def _answer_questions(self, model, dataset: Dataset) -> dict[int, str]:
        device = next(model.parameters()).device
        candidates = self.tokenizer(self.candidates, padding="longest", return_tensors="pt").to(device)
        predictions: dict[int, str] = {}
        for start in range(0, len(dataset), self.batch_size):
            rows = dataset[start : start + self.batch_size]
            decoded = self.decode({"image": rows["image"], "question": rows["question"]})
            readable = [index for index, image in enumerate(decoded["image"]) if image is not None]
            for index in range(len(rows["question_id"])):
                predictions[int(rows["question_id"][index])] = ""
            if not readable:
                continue
            batch = self.collate(
                [{"image": decoded["image"][i], "question": decoded["question"][i]} for i in readable]
            )
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            for index, answer in zip(readable, self._answers(model, batch, candidates)):
                predictions[int(rows["question_id"][index])] = answer
        return predictions

    def _answers(self, model, batch: dict[str, torch.Tensor], candidates) -> list[str]:
        if self.inference == "generate":
            ids = model.generate(
                batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **self.generate_kwargs
            )
            return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        chosen = rank_answers(
            model,
            batch["input_ids"],
            batch["pixel_values"],
            candidates["input_ids"],
            batch["attention_mask"],
            candidates["attention_mask"],
            k=self.k,
            scoring=self.scoring,
        )
        return [self.candidates[index] for index in chosen.tolist()]


def vqa_evaluation(predictor: AnswerPredictor) -> Callable[[Any, Dataset], dict[str, float]]:
    """The `task_evaluation` of `BlipFineTuningTrainer`: VQA accuracy of `predictor`'s answers, in percent."""

    def evaluate(model, dataset: Dataset) -> dict[str, float]:
        return answer_accuracy(predictor(model, dataset), dataset)

    return evaluate


def answer_accuracy(predictions: dict[int, str], dataset: Dataset) -> dict[str, float]:
    """`{"accuracy": percent}` of `{question_id: answer}` against the human answers of `dataset`."""
    human_answers = {int(qid): answers for qid, answers in zip(dataset["question_id"], dataset["answers"])}
    return vqa_accuracy(predictions, human_answers)


def write_vqa_results(predictions: dict[int, str], path: str | os.PathLike) -> None:
    """The evaluation server's result file: `[{"question_id": int, "answer": str}]`, in question id order."""
    results = [{"question_id": int(qid), "answer": answer} for qid, answer in sorted(predictions.items())]
    write_text_atomically(path, json.dumps(results))


def has_human_answers(dataset: Dataset) -> bool:
    """Whether every question of `dataset` has human answers to score against (test splits of VQA v2 have none)."""
    return "answers" in dataset.column_names and all(len(answers) > 0 for answers in dataset["answers"])


def candidate_answers(answer_list_file: str | None, train: Dataset, min_count: int = 1) -> list[str]:
    """The rank inference's candidates: BLIP's `answer_list.json` when given, else the training answers."""
    if answer_list_file is None:
        return vqa_answer_list(train, min_count=min_count)
    with open(answer_list_file) as file:
        candidates = json.load(file)
    if not isinstance(candidates, list) or not all(isinstance(answer, str) for answer in candidates):
        raise ValueError(f"{answer_list_file}: an answer list is a JSON list of strings")
    return candidates


# ------------------------------------------------------------------------------------------------------ the runs
def start_task_model(
    model_class: type[BlipPreTrainedModel],
    image_size: int,
    model_size: str = "tiny",
    model_name_or_path: str | None = None,
    pretraining_checkpoint: str | None = None,
    corpus: Callable[[], Sequence[str]] | None = None,
    vocab_size: int = 30522,
    resume_checkpoint: str | None = None,
    training_args: TrainingArguments | None = None,
    label_smoothing: float | None = None,
    dropout: float | None = None,
) -> tuple[BlipPreTrainedModel, PreTrainedTokenizerBase]:
    """The head a fine-tuning run starts from, with its tokenizer: a saved head (`model_name_or_path`, ours or in
    transformers' layout), a head built from a pretraining run (`pretraining_checkpoint`, at `image_size`), or a
    fresh `model_size` model whose vocabulary is trained on `corpus()` once for every rank (`training_args`'s main
    process), or, when the run resumes, read back from `resume_checkpoint` (WordPiece training need not number the
    tokens the same way twice).

    `label_smoothing` and `dropout` set the text models' regularisation; a start from transformers' layout, which
    has none, gets BLIP's 0.1 and 0.1 unless they are given, and the log says so (`training_regularisation`).
    """
    if model_name_or_path and pretraining_checkpoint:
        raise ValueError("give --model_name_or_path or --pretraining_checkpoint, not both")
    model, tokenizer, start = _start(
        model_class, image_size, model_size, model_name_or_path, pretraining_checkpoint, corpus, vocab_size,
        resume_checkpoint, training_args,
    )  # fmt: skip
    message = training_regularisation(model, start, label_smoothing, dropout)
    if message:
        logger.warning(message)
    return model, tokenizer


def _start(
    model_class, image_size, model_size, model_name_or_path, pretraining_checkpoint, corpus, vocab_size,
    resume_checkpoint, training_args,
) -> tuple[BlipPreTrainedModel, PreTrainedTokenizerBase, str]:  # fmt: skip
    """`start_task_model`'s head and tokenizer, with the kind of start (see `training_regularisation`)."""
    if model_name_or_path:
        model = model_class.from_pretrained(model_name_or_path)
        return model, AutoTokenizer.from_pretrained(model_name_or_path), checkpoint_layout(model_name_or_path)
    if pretraining_checkpoint:
        from ..modeling_pretraining import BlipForPreTraining

        pretraining = BlipForPreTraining.from_pretrained(pretraining_checkpoint)
        config = type(pretraining.config).from_dict(pretraining.config.to_dict())
        config.vision_config.image_size = image_size  # the ViT's position embeddings are resized to it
        model = task_head_from_pretraining(model_class, pretraining, config=config)
        return model, AutoTokenizer.from_pretrained(pretraining_checkpoint), "pretraining"
    tokenizer = run_vocabulary(corpus, vocab_size, training_args, resume_checkpoint)
    config = pretraining_config(model_size, image_size, text_config_token_kwargs(tokenizer))
    return model_class(config), tokenizer, "fresh"


def write_run_summary(output_dir: str, title: str, metrics: dict[str, Any], notes: Sequence[str] = ()) -> None:
    """`metrics.json` and a short `results.md` (a table of the metrics and a few notes) in `output_dir`."""
    write_text_atomically(os.path.join(output_dir, "metrics.json"), json.dumps(metrics, indent=1))
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for name, value in metrics.items():
        shown = f"{value:.2f}" if isinstance(value, float) and math.isfinite(value) else str(value)
        lines.append(f"| {name} | {shown} |")
    lines += ["", *notes]
    write_text_atomically(os.path.join(output_dir, "results.md"), "\n".join(lines) + "\n")


def vqa_texts(dataset: Dataset) -> list[str]:
    """Questions and answers of a VQA split: the corpus a fresh tokenizer is trained on."""
    answers = [answer for row_answers in dataset["unique_answers"] for answer in row_answers]
    return list(dataset["question"]) + answers


__all__ = [
    "INFERENCE_MODES",
    "QUESTION_MAX_LENGTH",
    "RANK_SCORINGS",
    "AnswerPredictor",
    "VqaCollator",
    "answer_accuracy",
    "candidate_answers",
    "checkpoint_to_resume",
    "has_human_answers",
    "held_out_split",
    "load_vqa_splits",
    "rank_answers",
    "start_task_model",
    "vqa_evaluation",
    "vqa_texts",
    "write_run_summary",
    "write_vqa_results",
]
