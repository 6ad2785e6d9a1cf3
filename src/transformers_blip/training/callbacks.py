"""Trainer callbacks for BLIP: the momentum encoders' EMA step and the distillation alpha, once per optimizer step."""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / compile / accelerate wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class MomentumUpdateCallback(TrainerCallback):
    """Steps the momentum encoders after every optimizer step and keeps the model's alpha ramp on the global step.

    `Trainer` calls `on_step_end` once per optimizer step, after `optimizer.step()` and before a checkpoint is
    written, so a checkpoint holds the momentum weights that belong to its step and a resumed run continues exactly.
    `model.optimizer_steps` is set from `state.global_step` (restored by a resume) before every step.
    """

    def _sync_step(self, state: TrainerState, model: nn.Module | None) -> nn.Module | None:
        if model is None:
            return None
        model = unwrap_model(model)
        model.optimizer_steps = state.global_step
        return model

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._sync_step(state, kwargs.get("model"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._sync_step(state, kwargs.get("model"))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = self._sync_step(state, kwargs.get("model"))
        if model is not None:
            model._momentum_update()


__all__ = ["MomentumUpdateCallback", "unwrap_model"]
