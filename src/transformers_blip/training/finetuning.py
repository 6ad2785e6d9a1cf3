"""`BlipFineTuningTrainer`: the Trainer that every fine-tuning script shares.

It brings BLIP's optimisation (`BlipOptimizationMixin`: the original's per-epoch cosine, weight decay on every
parameter), sealed, verified checkpoints (`VerifiedCheckpointsMixin`) and each part of a loss in the logs
(`LossPartsLoggingMixin`: retrieval's ITC and ITM, with alpha and temperature), and it evaluates with the task's own
metric instead of a loss: `task_evaluation(model, dataset) -> {name: value}` (CIDEr for captioning, recall for
retrieval, VQA or NLVR2 accuracy). Trainer then does what it does with any metric: logs it with the `eval_` prefix,
and with `metric_for_best_model` and `load_best_model_at_end` keeps the best checkpoint, as the original's scripts
keep the best epoch by their validation metric.

Under several processes `task_evaluation` runs on every rank (each may take its share of the split and gather the
results); its metrics must be the same on every rank, as Trainer's best-checkpoint choice is made on each.
`predict_in_shares` is that split, for every task: each rank predicts a contiguous share of the split, the shares
are gathered in rank order, and no sample is predicted twice (a DistributedSampler would pad the last shares with
repeats).

Also shared by the scripts:
- `ResumableAugmentation`: training augmentations whose random choices follow torch's generator, which Trainer's
  checkpoints restore, so that a resumed run sees the augmentations of an uninterrupted one, with DataLoader workers
  or without.
- `training_regularisation`: a start from transformers' layout, which carries no label smoothing and no dropout,
  trains with BLIP's (0.1 and 0.1) unless the user sets others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import speed_metrics

from ..configuration_blip import BlipConfig, BlipTextConfig
from ..losses import rank_and_world_size
from .callbacks import unwrap_model
from .checkpoints import CheckpointError, VerifiedCheckpointsMixin
from .schedules import BlipOptimizationMixin, OptimizationArguments, apply_optimization_arguments
from .trainer import LossPartsLoggingMixin, optimizer_steps_per_epoch

TaskEvaluation = Callable[[Any, Any], dict[str, float]]
Prediction = TypeVar("Prediction")

# BLIP's training regularisation (configs/med_config.json and the decoder's loss), which transformers' layout lacks.
BLIP_LABEL_SMOOTHING = 0.1
BLIP_TEXT_DROPOUT = 0.1


class BlipFineTuningTrainer(LossPartsLoggingMixin, VerifiedCheckpointsMixin, BlipOptimizationMixin, Trainer):
    """Trainer for BLIP's task heads. `task_evaluation`, when given, replaces Trainer's loss evaluation.

    Args:
        task_evaluation: `(model, dataset) -> metrics`, given the unwrapped head in eval mode (its mode is restored
            after); it decides about `torch.inference_mode` and batching.
        *args, **kwargs: `Trainer`'s.
    """

    def __init__(self, *args, task_evaluation: TaskEvaluation | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_evaluation = task_evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.task_evaluation is None:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs a dataset: pass eval_dataset to the trainer or to evaluate()")
        model = unwrap_model(self.model)
        was_training = model.training
        model.eval()
        start = time.time()
        try:
            task_metrics = self.task_evaluation(model, dataset)
        finally:
            model.train(was_training)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in task_metrics.items()}
        metrics.update(speed_metrics(metric_key_prefix, start, num_samples=len(dataset)))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def predict_in_shares(predict: Callable[[Dataset], Sequence[Prediction]], dataset: Dataset) -> list[Prediction]:
    """`predict(share)` of this rank's contiguous share of `dataset`, gathered from every rank in rank order: the
    predictions of the whole split, in its order, on every rank. Every rank must call it (the gather is collective);
    in a single process it is `predict(dataset)`.

    The shares are `Dataset.shard(contiguous=True)`: they differ in size by at most one row and are never padded,
    so each row is predicted exactly once.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return list(predict(dataset))
    local = list(predict(dataset.shard(num_shards=world_size, index=rank, contiguous=True)))
    shares: list[list[Prediction] | None] = [None] * world_size
    torch.distributed.all_gather_object(shares, local)
    return [prediction for share in shares for prediction in share]


class ResumableAugmentation:
    """A training image transform whose random choices follow torch's generator, in the main process as in workers.

    `BlipTrainTransform` draws from one stream per process. In a DataLoader worker that stream is reseeded every
    epoch from torch's generator, which Trainer's checkpoints restore; in the main process
    (`dataloader_num_workers=0`) it runs through the whole run and starts again from its beginning when the run
    resumes, so a resumed run would repeat the first epochs' augmentations. Here every image takes its own seed from
    torch's generator (restored on resume in the main process, seeded per worker and epoch in workers), which makes
    a resumed run see exactly the augmentations of an uninterrupted one either way.

    Args:
        make_transform: `seed -> transform`, e.g. `lambda seed: BlipTrainTransform(384, seed=seed)`; the transform
            is called as `transform(image)` or `transform.with_text(image, text)`.
    """

    def __init__(self, make_transform: Callable[[int], Any]):
        self.make_transform = make_transform

    def _seeded(self):
        seed = int(torch.randint(0, 2**62, ()).item())
        return self.make_transform(seed)

    def __call__(self, image):
        return self._seeded()(image)

    def with_text(self, image, text):
        """The image transformed, with its text kept true under a flip (see `BlipTrainTransform.with_text`)."""
        return self._seeded().with_text(image, text)


def checkpoint_layout(model_name_or_path: str) -> str:
    """`"transformers"` for a directory in transformers' own BLIP layout (`model_type: "blip"`, the hub's
    `Salesforce/blip-*`), `"ours"` for any other saved head."""
    return "transformers" if BlipConfig.is_transformers_layout(model_name_or_path) else "ours"


def training_regularisation(
    model: nn.Module, start: str, label_smoothing: float | None = None, dropout: float | None = None
) -> str | None:
    """Sets the label smoothing and dropout that `model`'s text models train with; returns a line for the log, if any.

    Values the user gives win. Otherwise a start from transformers' layout (`start="transformers"`), whose config
    carries neither (it describes inference), gets BLIP's training values (0.1 and 0.1); every other start keeps its
    config's. The values reach every text model of the head (VQA's answer decoder has a config of its own) and the
    dropout layers already built from the old values.
    """
    if start == "transformers":
        label_smoothing = BLIP_LABEL_SMOOTHING if label_smoothing is None else label_smoothing
        dropout = BLIP_TEXT_DROPOUT if dropout is None else dropout
    configs = [model.config.text_config] if isinstance(model.config, BlipConfig) else []
    text_models = [module for module in model.modules() if isinstance(getattr(module, "config", None), BlipTextConfig)]
    configs += [module.config for module in text_models]
    for config in {id(config): config for config in configs}.values():
        if label_smoothing is not None:
            config.label_smoothing = label_smoothing
        if dropout is not None:
            config.hidden_dropout_prob = dropout
            config.attention_probs_dropout_prob = dropout  # read at every call
    if dropout is not None:
        for text_model in text_models:
            for layer in text_model.modules():
                if isinstance(layer, nn.Dropout):  # built from hidden_dropout_prob
                    layer.p = dropout
    if start != "transformers":
        return None
    text_config = model.config.text_config
    return (
        f"transformers' BLIP layout carries no label smoothing and no dropout: fine-tuning with label smoothing "
        f"{text_config.label_smoothing} and text dropout {text_config.hidden_dropout_prob} (BLIP's are 0.1 and 0.1; "
        "--label_smoothing and --dropout set others)"
    )


def train_or_evaluate(
    trainer: BlipFineTuningTrainer,
    splits: dict[str, Dataset | None],
    optimization_args: OptimizationArguments,
    model_name_or_path: str | None,
) -> dict[str, Any]:
    """A classification-style task's run (VQA, NLVR2): trains with BLIP's optimisation and keeps the best
    checkpoint by validation accuracy, or with `--do_train false` evaluates the given weights on the validation
    split. Returns the summary's first entries; a damaged checkpoint to resume from stops with its name."""
    if trainer.args.do_train:
        steps_per_epoch = optimizer_steps_per_epoch(splits["train"], trainer.args)
        apply_optimization_arguments(trainer, optimization_args, steps_per_epoch)
        try:
            trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
        except CheckpointError as error:
            raise SystemExit(f"error: {error}") from error
        trainer.save_model()
        trainer.save_state()
        return {
            "best_checkpoint": trainer.state.best_model_checkpoint,
            "validation_accuracy": trainer.state.best_metric,
        }
    metrics: dict[str, Any] = {"evaluated": model_name_or_path}
    if splits["validation"] is not None:
        metrics["validation_accuracy"] = trainer.evaluate()["eval_accuracy"]
    return metrics


__all__ = [
    "BLIP_LABEL_SMOOTHING",
    "BLIP_TEXT_DROPOUT",
    "BlipFineTuningTrainer",
    "ResumableAugmentation",
    "TaskEvaluation",
    "checkpoint_layout",
    "predict_in_shares",
    "train_or_evaluate",
    "training_regularisation",
]
