"""`BlipFineTuningTrainer`: the Trainer that every fine-tuning script shares.

It brings BLIP's optimisation (`BlipOptimizationMixin`: the original's per-epoch cosine, weight decay on every
parameter) and sealed, verified checkpoints (`VerifiedCheckpointsMixin`), and it evaluates with the task's own
metric instead of a loss: `task_evaluation(model, dataset) -> {name: value}` (CIDEr for captioning, recall for
retrieval, VQA or NLVR2 accuracy). Trainer then does what it does with any metric: logs it with the `eval_` prefix,
and with `metric_for_best_model` and `load_best_model_at_end` keeps the best checkpoint, as the original's scripts
keep the best epoch by their validation metric.

Under several processes `task_evaluation` runs on every rank (each may take its share of the split and gather the
results); its metrics must be the same on every rank, as Trainer's best-checkpoint choice is made on each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import speed_metrics

from .callbacks import unwrap_model
from .checkpoints import VerifiedCheckpointsMixin
from .schedules import BlipOptimizationMixin

TaskEvaluation = Callable[[Any, Any], dict[str, float]]


class BlipFineTuningTrainer(VerifiedCheckpointsMixin, BlipOptimizationMixin, Trainer):
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


__all__ = ["BlipFineTuningTrainer", "TaskEvaluation"]
