"""BLIP's learning-rate schedules and optimiser rules, as a Trainer uses them.

The original sets the learning rate by hand in its training loops (`utils.py`):

- pretraining (`pretrain.py`): at the start of epoch e the rate is `max(min_lr, init_lr * decay_rate**e)`; during
  epoch 0 it is instead warmed up, step i of the epoch getting `min(init_lr, warmup_lr + (init_lr - warmup_lr) *
  i / warmup_steps)`. A warm-up longer than the first epoch is cut short by the second epoch's decay.
- fine-tuning (`train_caption.py`, `train_retrieval.py`, `train_vqa.py`, `train_nlvr.py`): one rate per epoch, a
  cosine from `init_lr` at epoch 0 towards `min_lr` at `max_epoch`, without warm-up.

`BlipLRSchedule` is that rule as a function of the optimizer step, so that `torch.optim.lr_scheduler.LambdaLR`
holds it: its state is the step count, which Trainer saves in every checkpoint, so a resumed run continues on the
same rates. The original also decays every parameter (AdamW's weight decay on biases and norms too, where Trainer
exempts them) and never clips gradients; `BlipOptimizationMixin` gives a Trainer both rules.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULE_KINDS = ("step_decay_with_warmup", "epoch_cosine")


@dataclass
class BlipLRSchedule:
    """The learning rate of each optimizer step under one of BLIP's schedules.

    Args:
        kind: `"step_decay_with_warmup"` (pretraining) or `"epoch_cosine"` (fine-tuning).
        steps_per_epoch: optimizer steps in one epoch on all ranks.
        init_lr: the peak (pretraining) or first (fine-tuning) learning rate; the optimizer's base rate.
        min_lr: the floor of the decay (pretraining) or the cosine's end (fine-tuning).
        warmup_lr, warmup_steps: pretraining's warm-up start and length, in optimizer steps of epoch 0.
        decay_rate: pretraining's factor per epoch.
        num_epochs: fine-tuning's `max_epoch`, the cosine's period.
    """

    kind: str
    steps_per_epoch: int
    init_lr: float
    min_lr: float = 0.0
    warmup_lr: float = 1e-6
    warmup_steps: int = 3000
    decay_rate: float = 0.9
    num_epochs: int = 1

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be at least 1, got {self.steps_per_epoch}")
        if self.init_lr <= 0:
            raise ValueError(f"init_lr must be positive, got {self.init_lr}")
        if self.kind == "epoch_cosine" and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be at least 1, got {self.num_epochs}")

    @classmethod
    def for_run(cls, kind: str, args, steps_per_epoch: int, **fields) -> BlipLRSchedule:
        """The schedule of a Trainer run: `init_lr` is `args.learning_rate`, the warm-up `args.warmup_steps` (a share
        of the run's steps when below 1, as Trainer reads it), the epochs `args.num_train_epochs`."""
        num_epochs = max(math.ceil(args.num_train_epochs), 1)
        total_steps = args.max_steps if args.max_steps > 0 else steps_per_epoch * num_epochs
        return cls(
            kind=kind,
            steps_per_epoch=steps_per_epoch,
            init_lr=args.learning_rate,
            warmup_steps=args.get_warmup_steps(total_steps),
            num_epochs=num_epochs,
            **fields,
        )

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0 = the first step)."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if self.kind == "epoch_cosine":
            progress = math.cos(math.pi * epoch / self.num_epochs)
            return (self.init_lr - self.min_lr) * 0.5 * (1.0 + progress) + self.min_lr
        if epoch == 0:
            warmed = self.warmup_lr + (self.init_lr - self.warmup_lr) * step_in_epoch / max(self.warmup_steps, 1)
            return min(self.init_lr, warmed)
        return max(self.min_lr, self.init_lr * self.decay_rate**epoch)

    def __call__(self, step: int) -> float:
        """The factor on the optimizer's base rate (`init_lr`), as `LambdaLR` wants it."""
        return self.lr(step) / self.init_lr


def blip_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: BlipLRSchedule) -> LambdaLR:
    """A `LambdaLR` that follows `schedule`; the optimizer's rates must be `schedule.init_lr`."""
    for group in optimizer.param_groups:
        base_lr = group.get("initial_lr", group["lr"])
        if not math.isclose(base_lr, schedule.init_lr, rel_tol=1e-9):
            raise ValueError(
                f"the optimizer's learning rate ({base_lr}) must be the schedule's init_lr ({schedule.init_lr}): "
                "set --learning_rate to init_lr"
            )
    return LambdaLR(optimizer, schedule)


class BlipOptimizationMixin:
    """Trainer mixin for BLIP's optimisation: weight decay on every parameter and, when `blip_lr_schedule` is set
    (a `BlipLRSchedule`), its learning rates in place of Trainer's `lr_scheduler_type`.

    Put it before `Trainer` in the bases. Gradient clipping is Trainer's `max_grad_norm`: the recipes set it to 0,
    which turns clipping off, as the original trains.
    """

    blip_lr_schedule: BlipLRSchedule | None = None
    decay_all_parameters: bool = True

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        if not self.decay_all_parameters:
            return super().get_decay_parameter_names(model)
        return [name for name, _ in model.named_parameters()]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.blip_lr_schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = blip_lr_scheduler(optimizer or self.optimizer, self.blip_lr_schedule)
        self._created_lr_scheduler = True
        return self.lr_scheduler


@dataclass
class OptimizationArguments:
    """The command-line arguments of BLIP's optimisation, shared by the training scripts (`HfArgumentParser`)."""

    recipe: str | None = field(
        default=None, metadata={"help": "A preset of the original's values (transformers_blip.training.RECIPES)."}
    )
    lr_schedule: str = field(
        default="trainer",
        metadata={
            "help": "trainer (--lr_scheduler_type), or BLIP's: step_decay_with_warmup (pretraining: --warmup_lr to "
            "--learning_rate over --warmup_steps, then x --lr_decay_rate per epoch, floor --min_lr) or "
            "epoch_cosine (fine-tuning: from --learning_rate at epoch 0 towards --min_lr).",
            "choices": ("trainer", *SCHEDULE_KINDS),
        },
    )
    min_lr: float = field(default=0.0, metadata={"help": "Floor (or end) of BLIP's schedules."})
    warmup_lr: float = field(default=1e-6, metadata={"help": "Where BLIP's pretraining warm-up starts."})
    lr_decay_rate: float = field(default=0.9, metadata={"help": "BLIP's pretraining decay per epoch."})
    weight_decay_all: bool = field(
        default=False, metadata={"help": "Decay biases and norms too, as the original; Trainer spares them."}
    )


def apply_optimization_arguments(trainer, args: OptimizationArguments, steps_per_epoch: int) -> None:
    """Gives a `BlipOptimizationMixin` trainer the optimisation `args` ask for."""
    trainer.decay_all_parameters = args.weight_decay_all
    if args.lr_schedule != "trainer":
        trainer.blip_lr_schedule = BlipLRSchedule.for_run(
            args.lr_schedule,
            trainer.args,
            steps_per_epoch,
            min_lr=args.min_lr,
            warmup_lr=args.warmup_lr,
            decay_rate=args.lr_decay_rate,
        )


def describe_schedule(schedule: BlipLRSchedule) -> str:
    """One line for the log: the schedule's fields."""
    return ", ".join(f"{name}={value}" for name, value in asdict(schedule).items())


__all__ = [
    "SCHEDULE_KINDS",
    "BlipLRSchedule",
    "BlipOptimizationMixin",
    "OptimizationArguments",
    "apply_optimization_arguments",
    "blip_lr_scheduler",
    "describe_schedule",
]
