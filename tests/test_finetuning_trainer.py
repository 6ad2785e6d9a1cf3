"""BlipFineTuningTrainer: evaluation by the task's metric, the best checkpoint kept by it, sealed checkpoints."""

import pytest
import torch
from safetensors.torch import load_file
from test_schedules import RowsDataset, TinyRegression
from transformers import TrainingArguments

from transformers_blip.training.checkpoints import verify_checkpoint
from transformers_blip.training.finetuning import BlipFineTuningTrainer


def test_the_task_metric_picks_the_best_checkpoint(tmp_path):
    scores = iter([0.2, 0.9, 0.5])  # epoch 2 is the best
    seen = []

    def task_evaluation(model, dataset):
        seen.append((model.training, len(dataset)))
        return {"score": next(scores)}

    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-3,
        eval_strategy="epoch", save_strategy="epoch", metric_for_best_model="score", greater_is_better=True,
        load_best_model_at_end=True, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = BlipFineTuningTrainer(
        model=TinyRegression(), args=args, train_dataset=RowsDataset(), eval_dataset=RowsDataset(6),
        task_evaluation=task_evaluation,
    )  # fmt: skip
    trainer.train()
    assert seen == [(False, 6)] * 3  # in eval mode, on the evaluation split
    assert trainer.model.training  # training mode restored after each evaluation
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-8")  # 4 steps an epoch: epoch 2
    assert [entry["eval_score"] for entry in trainer.state.log_history if "eval_score" in entry] == [0.2, 0.9, 0.5]
    verify_checkpoint(trainer.state.best_model_checkpoint)
    best = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    assert torch.equal(trainer.model.linear.weight, best["linear.weight"])  # the best one reloaded


def test_evaluation_without_a_dataset_is_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = BlipFineTuningTrainer(model=TinyRegression(), args=args, task_evaluation=lambda model, data: {})
    with pytest.raises(ValueError, match="needs a dataset"):
        trainer.evaluate()
