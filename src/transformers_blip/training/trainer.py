"""`BlipPreTrainingTrainer`: Trainer for BLIP's pretraining, with each loss logged, and the checks a launch needs."""

from __future__ import annotations

import math
import os

import torch
from datasets import Dataset, IterableDataset
from transformers import Trainer, TrainingArguments, enable_full_determinism, set_seed

from .callbacks import MomentumUpdateCallback, unwrap_model
from .checkpoints import VerifiedCheckpointsMixin
from .schedules import BlipOptimizationMixin

LOGGED_LOSSES = ("loss_itc", "loss_itm", "loss_lm")  # the parts of a loss that are logged, where a model gives them


def check_processes_train_together(args: TrainingArguments) -> None:
    """Stops a run launched as several processes (`torchrun`, `accelerate launch`) that Trainer would not join.

    Without an accelerator, `TrainingArguments` joins the launched processes only when `use_cpu` is set; otherwise
    each process trains alone, on all the data, and every one of them writes to the same output directory.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"launched as {launched} processes, but Trainer would train {args.world_size} model(s) independently; "
            "on a machine without GPUs pass --use_cpu so that the processes train together (DDP over gloo)"
        )


def seed_run(args: TrainingArguments) -> None:
    """Seeds a run before it builds its model, whose initial weights (and queues) are its first random draws: Trainer
    seeds only when it is created, after the model. `--full_determinism` also turns on PyTorch's deterministic
    algorithms, so that the same command gives bit-identical weights on a CPU."""
    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)


def optimizer_steps_per_epoch(dataset: Dataset | IterableDataset, args: TrainingArguments) -> int:
    """Optimizer steps in one pass over `dataset` on all ranks (`max_steps` for a stream of unknown length)."""
    if isinstance(dataset, IterableDataset):
        return max(args.max_steps, 1)
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return max(math.ceil(len(dataset) / samples_per_step), 1)


class LossPartsLoggingMixin:
    """Logs each part of the loss a model's output carries (`LOGGED_LOSSES`: ITC, ITM, LM) beside Trainer's `loss`,
    as means over the micro-batches since the last log and over all ranks, like Trainer's own; and, for a model with
    momentum distillation, its alpha and temperature. A model whose output has no parts logs only `loss`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_names: tuple[str, ...] = ()  # the parts this model's outputs carry, found on the first batch
        self._loss_sums: torch.Tensor | None = None  # their sums since the last log
        self._loss_count = 0

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            if self._loss_sums is None:
                self._loss_names = tuple(name for name in LOGGED_LOSSES if outputs.get(name) is not None)
            if self._loss_names:
                parts = torch.stack([outputs[name].detach().float() for name in self._loss_names])
                self._loss_sums = parts if self._loss_sums is None else self._loss_sums + parts
                self._loss_count += 1
        loss = outputs["loss"]  # a ModelOutput, or a plain dict of the same fields
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Trainer calls `log` with the training loss on every rank at once, so the reduction below is collective.
        if "loss" in logs and self._loss_count > 0:
            means = self.accelerator.reduce(self._loss_sums / self._loss_count, reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(self._loss_names, means.tolist())})
            model = unwrap_model(self.model)
            if hasattr(model, "distillation_alpha"):
                logs["alpha"] = model.distillation_alpha()
                logs["temperature"] = round(model.temp.item(), 5)
            self._loss_sums, self._loss_count = None, 0
        super().log(logs, start_time)


class BlipPreTrainingTrainer(LossPartsLoggingMixin, VerifiedCheckpointsMixin, BlipOptimizationMixin, Trainer):
    """`Trainer` for [`BlipForPreTraining`]: adds the momentum callback and logs each loss, alpha and temperature.

    Its checkpoints are atomic and sealed, and a resume verifies them first (`VerifiedCheckpointsMixin`);
    `resume_from_checkpoint=True` picks the newest complete one. BLIP's optimisation is there to turn on
    (`BlipOptimizationMixin`): set `blip_lr_schedule` for the original's learning rates, and `decay_all_parameters`
    (off by default here, Trainer's choice) for weight decay on biases and norms too.

    The logged `loss_itc`, `loss_itm` and `loss_lm` are means over the micro-batches since the last log and over all
    ranks, like Trainer's own `loss`.

    A collator may return `None` for a batch whose every sample was unreadable (`SkippingCollator`,
    `DecodingCollator`; the samples are counted in their `SkipReport`). On one process the batch is passed over and
    the next one read in its place (`empty_batches` counts them). Under several processes a rank cannot pass a batch
    over without leaving the others waiting in the gradient all-reduce, so it stops with an error that says so.
    """

    decay_all_parameters = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(callback, MomentumUpdateCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(MomentumUpdateCallback())
        self.empty_batches = 0

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        return super().get_batch_samples(self._non_empty(epoch_iterator), num_batches, device)

    def _non_empty(self, batches):
        """The batches of `batches` that hold samples. Reads no further ahead than its consumer asks."""
        for batch in batches:
            if batch is not None:
                yield batch
                continue
            if self.args.world_size > 1:
                raise RuntimeError(
                    "Every sample of a batch was unreadable (see the skip report), and under several processes a "
                    "rank cannot pass a batch over while the others train on theirs. Clean the data or raise "
                    "per_device_train_batch_size."
                )
            self.empty_batches += 1


__all__ = [
    "LOGGED_LOSSES",
    "BlipPreTrainingTrainer",
    "LossPartsLoggingMixin",
    "check_processes_train_together",
    "optimizer_steps_per_epoch",
    "seed_run",
]
