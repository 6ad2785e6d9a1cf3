"""Retrieval fine-tuning as the original's `train_retrieval.py` does it: the start, the batches, evaluation, results.

- Where a run starts (`start_retrieval_head`): a saved [`BlipForImageTextRetrieval`] (ours or transformers' layout),
  an original Salesforce `.pth`, a pretraining run, or a fresh model; the head is then wrapped in a
  [`BlipForRetrievalTraining`] whose momentum encoders start equal to it (`retrieval_training_model`), with the
  queue, alpha and its ramp over the first epoch, and gradient checkpointing of the last ViT blocks.
- Batches (`retrieval_training_collator`): `pre_caption(caption, max_words)` tokenized to `max_length` tokens (the
  original's 30 words and 35 tokens), augmented images, and each pair's image id.
- Evaluation (`RetrievalEvaluation`): ITC similarity of every image with every text, the `k_test` best re-ranked by
  ITM (`retrieval_scores`, split across ranks), recall@1/5/10 both ways and `r_mean` (`retrieval_recall`); the best
  checkpoint is the one with the highest validation `r_mean`, as the original keeps it.
- Results (`write_retrieval_outputs`): `metrics.json`, `results.md` and `retrieval_result.json`, the test split's
  texts and, for each image and each text, the ids of its 10 best-ranked candidates, best first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments

from ..atomic_writes import write_text_atomically
from ..configuration_blip import BlipConfig
from ..convert.original import load_original_checkpoint
from ..data import BlipEvalTransform, DecodeImages, SkipReport
from ..evaluation.retrieval_eval import split_retrieval_scores
from ..evaluation.retrieval_metrics import retrieval_recall
from ..modeling_blip import BlipForImageTextRetrieval
from ..modeling_retrieval_training import BlipForRetrievalTraining
from .collators import DecodingCollator, ImageTextCollator
from .finetuning import checkpoint_layout, training_regularisation
from .vqa import start_task_model

# The original's text handling in retrieval: captions cleaned to 30 words, tokenized to at most 35 tokens.
RETRIEVAL_MAX_WORDS = 30
RETRIEVAL_MAX_LENGTH = 35
# Candidates kept per query in the result file.
RESULT_TOP_K = 10
RESULT_FILE = "retrieval_result.json"


def start_retrieval_head(
    image_size: int,
    model_size: str = "tiny",
    model_name_or_path: str | None = None,
    pretraining_checkpoint: str | None = None,
    tokenizer_name_or_path: str | None = None,
    corpus: Callable[[], Sequence[str]] | None = None,
    vocab_size: int = 30522,
    resume_checkpoint: str | None = None,
    training_args: TrainingArguments | None = None,
    dropout: float | None = None,
) -> tuple[BlipForImageTextRetrieval, PreTrainedTokenizerBase, str]:
    """The retrieval head a run starts from, its tokenizer and the kind of start: `"original"` (a Salesforce `.pth`
    in `model_name_or_path`, whose ViT position embeddings are resized to `image_size`; the tokenizer from
    `tokenizer_name_or_path`), `"transformers"` or `"ours"` (a saved head), `"pretraining"` (a pretraining run, at
    `image_size`) or `"fresh"` (a `model_size` model with a vocabulary trained on `corpus()`); see
    `start_task_model`. `dropout` sets the text dropout (a start from transformers' layout gets BLIP's 0.1 unless it
    is given, and the log says so)."""
    if model_name_or_path and pretraining_checkpoint:
        raise ValueError("give --model_name_or_path or --pretraining_checkpoint, not both")
    if model_name_or_path and str(model_name_or_path).endswith((".pth", ".pt")):
        if tokenizer_name_or_path is None:
            raise ValueError(f"{model_name_or_path} holds no tokenizer: pass --tokenizer_name_or_path")
        head, _ = load_original_checkpoint(model_name_or_path, head="retrieval", image_size=image_size)
        training_regularisation(head, "original", dropout=dropout)
        return head, AutoTokenizer.from_pretrained(tokenizer_name_or_path), "original"
    head, tokenizer = start_task_model(
        BlipForImageTextRetrieval, image_size, model_size, model_name_or_path, pretraining_checkpoint, corpus,
        vocab_size, resume_checkpoint, training_args, dropout=dropout,
    )  # fmt: skip
    if model_name_or_path:
        return head, tokenizer, checkpoint_layout(model_name_or_path)
    return head, tokenizer, "pretraining" if pretraining_checkpoint else "fresh"


def retrieval_training_model(
    head: BlipForImageTextRetrieval,
    steps_per_epoch: int,
    queue_size: int | None = None,
    alpha: float = 0.4,
    momentum: float | None = None,
    negative_all_rank: bool = False,
    vision_gradient_checkpointing_layers: int = 0,
) -> BlipForRetrievalTraining:
    """`head` as a [`BlipForRetrievalTraining`] with the original retrieval's training settings.

    Args:
        head: the start (`start_retrieval_head`); its config, dropout included, is the training model's.
        steps_per_epoch: optimizer steps of one epoch: alpha ramps from 0 over them, as the original ramps it over
            its first epoch.
        queue_size, momentum: the queue's length and the momentum encoders' EMA rate; `None` keeps the head config's.
        alpha: weight of the momentum targets in ITC.
        negative_all_rank: draw ITM negatives from every rank's batch (the original's COCO setting).
        vision_gradient_checkpointing_layers: recompute the activations of the last N ViT blocks in the backward
            pass (the original's `vit_ckpt_layer`), 0 for none.
    """
    if vision_gradient_checkpointing_layers < 0:
        raise ValueError(
            f"vision_gradient_checkpointing_layers must be >= 0, got {vision_gradient_checkpointing_layers}"
        )
    config = BlipConfig.from_dict(head.config.to_dict())
    config.alpha, config.alpha_warmup_steps = alpha, steps_per_epoch
    config.negative_all_rank = negative_all_rank
    config.itc_global_keys = False  # the original's ITC keys: this rank's momentum features, then the queue
    if queue_size is not None:
        config.queue_size = queue_size
    if momentum is not None:
        config.momentum = momentum
    if vision_gradient_checkpointing_layers > 0:
        config.vision_config.gradient_checkpointing_layers = vision_gradient_checkpointing_layers
    model = BlipForRetrievalTraining.from_retrieval_model(head, config)
    if vision_gradient_checkpointing_layers > 0:
        # The ViT alone, as the original: the text encoders keep their activations.
        model.vision_model.activation_checkpointing_enable({"use_reentrant": False})
    return model


def retrieval_training_collator(
    tokenizer: PreTrainedTokenizerBase,
    image_transform: Callable,
    max_words: int = RETRIEVAL_MAX_WORDS,
    max_length: int = RETRIEVAL_MAX_LENGTH,
    report: SkipReport | None = None,
) -> DecodingCollator:
    """The training `data_collator` of rows `{image, caption, image_id}`: images decoded and augmented in the
    DataLoader workers (broken ones skipped and counted in `report`), captions cleaned and tokenized, image ids
    batched as `image_ids`."""
    decode = DecodeImages(image_transform, text_columns=("caption",), report=report)
    collate = ImageTextCollator(
        tokenizer, None, max_length=max_length, max_words=max_words, image_id_column="image_id", padding="longest"
    )
    return DecodingCollator(decode, collate)


class RetrievalEvaluation:
    """`task_evaluation` for `BlipFineTuningTrainer`: recall@1/5/10 both ways and `r_mean` of ITC top-`k_test`
    candidates re-ranked by ITM, on a split `{image, captions, image_id}`.

    Under several processes each rank encodes and scores its share of the split and all get the same metrics
    (`retrieval_scores`). The latest evaluation's rankings stay in `self.rankings` for the result file.

    Args:
        tokenizer: BLIP's tokenizer.
        image_size: side of the evaluation images.
        k_test: candidates re-ranked by ITM per query (the original's 256 on COCO, 128 on Flickr30K).
        max_words, max_length: caption cleaning and tokenization (the original's 30 words, 35 tokens).
        batch_size: images and texts per forward of the unimodal encoders.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        k_test: int = 128,
        max_words: int = RETRIEVAL_MAX_WORDS,
        max_length: int = RETRIEVAL_MAX_LENGTH,
        batch_size: int = 64,
    ):
        self.tokenizer = tokenizer
        self.image_transform = BlipEvalTransform(image_size)
        self.k_test = k_test
        self.max_words = max_words
        self.max_length = max_length
        self.batch_size = batch_size
        self.rankings: dict[str, Any] = {}

    def __call__(self, model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
        scores = split_retrieval_scores(
            model, dataset, self.tokenizer, self.image_transform, k_test=self.k_test, max_length=self.max_length,
            max_words=self.max_words, batch_size=self.batch_size,
        )  # fmt: skip
        self.rankings = ranked_candidates(
            scores.score_i2t, scores.score_t2i, scores.texts, scores.text_to_image, list(dataset["image_id"])
        )
        return retrieval_recall(scores.score_i2t, scores.score_t2i, torch.tensor(scores.text_to_image))


def ranked_candidates(
    score_i2t: torch.Tensor,
    score_t2i: torch.Tensor,
    texts: Sequence[str],
    text_to_image: Sequence[int],
    image_ids: Sequence[int],
    top_k: int = RESULT_TOP_K,
) -> dict[str, Any]:
    """What `retrieval_result.json` holds: the split's texts (`text_id` is the position among them), and for each
    image the `text_id`s of its `top_k` best-scored texts and for each text the `image_id`s of its best images, best
    first."""
    texts_of_image = score_i2t.topk(min(top_k, score_i2t.shape[1]), dim=1).indices.tolist()  # (I, k)
    images_of_text = score_t2i.topk(min(top_k, score_t2i.shape[1]), dim=1).indices.tolist()  # (T, k)
    return {
        "texts": [
            {"text_id": index, "image_id": int(image_ids[image]), "caption": text}
            for index, (text, image) in enumerate(zip(texts, text_to_image))
        ],
        "image_to_text": [
            {"image_id": int(image_id), "text_ids": ranked} for image_id, ranked in zip(image_ids, texts_of_image)
        ],
        "text_to_image": [
            {"text_id": index, "image_ids": [int(image_ids[image]) for image in ranked]}
            for index, ranked in enumerate(images_of_text)
        ],
    }


_TIMINGS = ("runtime", "samples_per_second", "steps_per_second")


def _recalls(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The recalls of one evaluation's `metrics`, without their prefix and without Trainer's timings."""
    scores = {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
    return {key: value for key, value in scores.items() if key not in _TIMINGS}


def retrieval_run_summary(
    state: Any, test_metrics: dict[str, float], k_test: int, start: str, metric_for_best_model: str = "r_mean"
) -> dict[str, Any]:
    """What `metrics.json` holds: the best checkpoint, its validation recalls (from Trainer's `state.log_history`),
    the test recalls, `k_test` and the kind of start."""
    best = state.best_model_checkpoint
    best_step = int(best.rsplit("-", 1)[1]) if best else None
    val: dict[str, float] = {}
    for entry in state.log_history:
        if entry.get("step") == best_step and f"eval_{metric_for_best_model}" in entry:
            val = _recalls(entry, "eval_")
    return {
        "best_checkpoint": best,
        "metric_for_best_model": metric_for_best_model,
        "val": val,
        "test": _recalls(test_metrics, "test_"),
        "k_test": k_test,
        "start": start,
    }


def retrieval_evaluation_summary(
    evaluated: str, val_metrics: dict[str, float], test_metrics: dict[str, float], k_test: int, start: str
) -> dict[str, Any]:
    """What `metrics.json` holds after an evaluation without training: the model, its validation and test recalls,
    `k_test` and the kind of start."""
    val, test = _recalls(val_metrics, "val_"), _recalls(test_metrics, "test_")
    return {"evaluated": evaluated, "val": val, "test": test, "k_test": k_test, "start": start}


def retrieval_results_markdown(summary: dict[str, Any]) -> str:
    """A short `results.md`: recall@K both ways on validation and on test, of the best checkpoint or of the model
    evaluated without training."""
    names = [name for name in summary["test"] if name.startswith(("txt_r", "img_r", "r_mean"))]
    if "evaluated" in summary:
        origin = f"Evaluation of `{summary['evaluated']}`, without training"
    else:
        origin = f"Best checkpoint by validation {summary['metric_for_best_model']}: `{summary['best_checkpoint']}`"
    lines = [
        "# Retrieval fine-tuning",
        "",
        f"{origin}; ITC top {summary['k_test']} re-ranked by ITM.",
        "",
        "| split | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for split in ("val", "test"):
        recalls = summary.get(split) or {}
        lines.append(f"| {split} | " + " | ".join(f"{recalls[n]:.1f}" if n in recalls else "-" for n in names) + " |")
    lines += [
        "",
        "Recall in percent: `txt_r` image-to-text, `img_r` text-to-image. Rankings of the test split: "
        f"`{RESULT_FILE}`.",
    ]
    return "\n".join(lines) + "\n"


def write_retrieval_outputs(output_dir: str | os.PathLike, summary: dict[str, Any], rankings: dict[str, Any]) -> None:
    """`metrics.json`, `results.md` and `retrieval_result.json` in `output_dir`, each written atomically."""
    write_text_atomically(os.path.join(output_dir, "metrics.json"), json.dumps(summary, indent=1))
    write_text_atomically(os.path.join(output_dir, "results.md"), retrieval_results_markdown(summary))
    write_text_atomically(os.path.join(output_dir, RESULT_FILE), json.dumps(rankings))


__all__ = [
    "RESULT_FILE",
    "RESULT_TOP_K",
    "RETRIEVAL_MAX_LENGTH",
    "RETRIEVAL_MAX_WORDS",
    "RetrievalEvaluation",
    "ranked_candidates",
    "retrieval_evaluation_summary",
    "retrieval_results_markdown",
    "retrieval_run_summary",
    "retrieval_training_collator",
    "retrieval_training_model",
    "start_retrieval_head",
    "write_retrieval_outputs",
]
