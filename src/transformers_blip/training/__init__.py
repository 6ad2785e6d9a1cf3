"""Trainer glue for BLIP, one job a file.

- `callbacks`: the momentum encoders' EMA step and the distillation alpha, once per optimizer step.
- `collators`: image-text rows to batches (`ImageTextCollator`), decoding in the workers (`DecodingCollator`).
- `model_sizes`: the tiny, base and large sizes and the pretraining config of each.
- `data_sources`: the pairs a run trains on, the synthetic benchmark or a real format, by name.
- `trainer`: `BlipPreTrainingTrainer` and the checks a multi-process launch needs.
- `checkpoints`: atomic, sealed checkpoints and verified resumes for any Trainer (`VerifiedCheckpointsMixin`).
- `schedules`: BLIP's learning-rate schedules and optimiser rules (decay on every parameter) for any Trainer.
- `recipes`: the original's configurations as `--recipe` presets.
- `finetuning`: `BlipFineTuningTrainer`, evaluation by the task's metric for the fine-tuning scripts.

The ITC retrieval check moved to `transformers_blip.evaluation`; its names still import from here for one more
release.
"""

from .callbacks import MomentumUpdateCallback, unwrap_model
from .checkpoints import CheckpointError, VerifiedCheckpointsMixin, latest_complete_checkpoint, verify_checkpoint
from .collators import DecodingCollator, ImageTextCollator
from .data_sources import PAIR_COLUMNS, load_pretraining_pairs, with_caption_lengths
from .finetuning import BlipFineTuningTrainer
from .model_sizes import MODEL_SIZES, pretraining_config
from .recipes import RECIPES, parse_with_recipe
from .schedules import (
    BlipLRSchedule,
    BlipOptimizationMixin,
    OptimizationArguments,
    apply_optimization_arguments,
    blip_lr_scheduler,
)
from .trainer import (
    LOGGED_LOSSES,
    BlipPreTrainingTrainer,
    check_processes_train_together,
    optimizer_steps_per_epoch,
    seed_run,
)

_MOVED_TO_EVALUATION = ("itc_features", "itc_retrieval_recall", "recall_at_k")


def __getattr__(name: str):
    if name in _MOVED_TO_EVALUATION:
        import warnings

        from .. import evaluation

        warnings.warn(f"{__name__}.{name} moved to {evaluation.__name__}.{name}", FutureWarning, stacklevel=2)
        return getattr(evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LOGGED_LOSSES",
    "MODEL_SIZES",
    "PAIR_COLUMNS",
    "RECIPES",
    "BlipFineTuningTrainer",
    "BlipLRSchedule",
    "BlipOptimizationMixin",
    "BlipPreTrainingTrainer",
    "CheckpointError",
    "DecodingCollator",
    "ImageTextCollator",
    "MomentumUpdateCallback",
    "OptimizationArguments",
    "VerifiedCheckpointsMixin",
    "check_processes_train_together",
    "seed_run",
    "latest_complete_checkpoint",
    "load_pretraining_pairs",
    "apply_optimization_arguments",
    "blip_lr_scheduler",
    "optimizer_steps_per_epoch",
    "parse_with_recipe",
    "pretraining_config",
    "unwrap_model",
    "verify_checkpoint",
    "with_caption_lengths",
]
