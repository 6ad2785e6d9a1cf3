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


def test_augmentations_follow_torchs_generator_so_a_restored_state_repeats_them():
    """What a checkpoint restores in the main process is torch's generator: from the same state the augmentations
    repeat, even in a fresh transform (a resumed run's). BLIP's transform alone keeps a stream of its own, which a
    fresh transform starts again from its beginning: the resumed run would see the first epoch's augmentations."""
    from conftest import random_image

    from transformers_blip.data import BlipTrainTransform
    from transformers_blip.training.finetuning import ResumableAugmentation

    image = random_image(0, size=(48, 40))

    def resumable():
        return ResumableAugmentation(lambda seed: BlipTrainTransform(32, seed=seed))

    augment = resumable()
    torch.manual_seed(0)
    first_epoch = [augment(image) for _ in range(3)]
    state = torch.get_rng_state()
    second_epoch = [augment(image) for _ in range(3)]
    torch.set_rng_state(state)  # a resumed run: the checkpoint's generator, a new transform
    resumed = resumable()
    assert all(torch.equal(a, b) for a, b in zip(second_epoch, [resumed(image) for _ in range(3)]))
    assert not torch.equal(first_epoch[0], second_epoch[0])
    text = resumed.with_text(image, "the circle on the left")[1]
    assert text in ("the circle on the left", "the circle on the right")  # a flip swaps the sides of the text

    plain = BlipTrainTransform(32, seed=0)
    plain_first = [plain(image) for _ in range(3)]
    restarted = BlipTrainTransform(32, seed=0)
    assert torch.equal(restarted(image), plain_first[0])  # the stream starts over: not what epoch 2 would draw


def test_one_process_predicts_the_whole_split_in_order():
    from datasets import Dataset

    from transformers_blip.training.finetuning import predict_in_shares

    dataset = Dataset.from_dict({"value": [3, 1, 4, 1, 5]})
    shares = []

    def predict(share):
        shares.append(len(share))
        return [2 * value for value in share["value"]]

    assert predict_in_shares(predict, dataset) == [6, 2, 8, 2, 10] and shares == [5]
