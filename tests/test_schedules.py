"""BLIP's learning-rate schedules against the original's loops, written out here; exact resume; weight decay on every
parameter and no clipping under Trainer; recipes as overridable defaults."""

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainingArguments

from transformers_blip.training.recipes import RECIPES, parse_with_recipe
from transformers_blip.training.schedules import BlipLRSchedule, BlipOptimizationMixin, blip_lr_scheduler


def original_pretraining_rates(num_epochs, steps_per_epoch, init_lr, min_lr, warmup_lr, warmup_steps, decay_rate):
    """The rates the original's pretrain.py sets, step by step: the epoch's decay first, then epoch 0's warm-up."""
    rates = []
    for epoch in range(num_epochs):
        lr = max(min_lr, init_lr * (decay_rate**epoch))
        for i in range(steps_per_epoch):
            if epoch == 0:
                lr = min(init_lr, warmup_lr + (init_lr - warmup_lr) * i / warmup_steps)
            rates.append(lr)
    return rates


def original_finetuning_rates(num_epochs, steps_per_epoch, init_lr, min_lr):
    """The rates of the original's fine-tuning scripts: cosine_lr_schedule once per epoch."""
    rates = []
    for epoch in range(num_epochs):
        lr = (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / num_epochs)) + min_lr
        rates += [lr] * steps_per_epoch
    return rates


def rates_through_scheduler(schedule, num_steps):
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=schedule.init_lr)
    scheduler = blip_lr_scheduler(optimizer, schedule)
    rates = []
    for _ in range(num_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("warmup_steps", [7, 25])  # warm-up within the first epoch, and cut short by the second
def test_pretraining_schedule_equals_the_originals(warmup_steps):
    schedule = BlipLRSchedule(
        "step_decay_with_warmup", steps_per_epoch=10, init_lr=3e-4, min_lr=1e-4, warmup_lr=1e-6,
        warmup_steps=warmup_steps, decay_rate=0.5,
    )  # fmt: skip
    expected = original_pretraining_rates(5, 10, 3e-4, 1e-4, 1e-6, warmup_steps, 0.5)
    assert rates_through_scheduler(schedule, 50) == pytest.approx(expected, rel=1e-12)
    assert expected[-1] == 1e-4  # the floor is reached


def test_finetuning_schedule_equals_the_originals():
    schedule = BlipLRSchedule("epoch_cosine", steps_per_epoch=4, init_lr=1e-5, min_lr=0.0, num_epochs=6)
    expected = original_finetuning_rates(6, 4, 1e-5, 0.0)
    assert rates_through_scheduler(schedule, 24) == pytest.approx(expected, rel=1e-12)
    assert len(set(expected)) == 6  # one rate per epoch


def test_a_resumed_scheduler_continues_on_the_same_rates():
    schedule = BlipLRSchedule("step_decay_with_warmup", steps_per_epoch=6, init_lr=1e-3, warmup_steps=4)
    uninterrupted = rates_through_scheduler(schedule, 20)
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    scheduler = blip_lr_scheduler(optimizer, schedule)
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict(), optimizer.state_dict()
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1e-3)
    resumed = blip_lr_scheduler(optimizer, schedule)
    resumed.load_state_dict(state[0])
    optimizer.load_state_dict(state[1])
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        resumed.step()
    assert rates == pytest.approx(uninterrupted[9:], rel=1e-12)


def test_schedule_refuses_bad_values():
    with pytest.raises(ValueError, match="kind"):
        BlipLRSchedule("linear", steps_per_epoch=1, init_lr=1e-4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        BlipLRSchedule("epoch_cosine", steps_per_epoch=0, init_lr=1e-4)
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=5e-5)
    with pytest.raises(ValueError, match="--learning_rate"):
        blip_lr_scheduler(optimizer, BlipLRSchedule("epoch_cosine", steps_per_epoch=1, init_lr=1e-4))


class TinyRegression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x, labels=None):
        out = self.norm(self.linear(x))
        return {"loss": ((out - labels) ** 2).mean() * 1e3, "logits": out}  # large gradients: clipping would show


class RowsDataset(torch.utils.data.Dataset):
    def __init__(self, count=16):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(count, 4, generator=generator)
        self.y = torch.randn(count, 4, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


class BlipScheduleTrainer(BlipOptimizationMixin, Trainer):
    pass


def test_trainer_decays_every_parameter_follows_the_schedule_and_does_not_clip(tmp_path):
    schedule = BlipLRSchedule("epoch_cosine", steps_per_epoch=4, init_lr=1e-2, num_epochs=3)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-2,
        weight_decay=0.05, max_grad_norm=RECIPES["coco_caption"]["max_grad_norm"], logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = BlipScheduleTrainer(model=TinyRegression(), args=args, train_dataset=RowsDataset())
    trainer.blip_lr_schedule = schedule
    clip_calls = []
    clip = trainer._clip_grad_norm
    trainer._clip_grad_norm = lambda model: clip_calls.append(1) or clip(model)
    trainer.train()
    assert clip_calls == []  # max_grad_norm 0: no clipping, as the original
    # Every parameter, biases and the LayerNorm's included, in the decayed group.
    decayed = [group for group in trainer.optimizer.param_groups if group["weight_decay"] == 0.05]
    assert sum(len(group["params"]) for group in decayed) == 4
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert logged == pytest.approx([schedule.lr(step) for step in range(12)], rel=1e-9)


@dataclass
class FinetuneArguments:
    recipe: str | None = None
    image_size: int = 224
    prompt: str = ""
    num_beams: int = 1
    max_length: int = 30
    min_length: int = 0
    max_words: int = 50
    lr_schedule: str = "epoch_cosine"
    min_lr: float = 0.0
    weight_decay_all: bool = False
    extra: list[str] = field(default_factory=list)


def test_a_recipe_sets_the_originals_values_and_the_command_line_wins():
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    finetune, training = parse_with_recipe(
        parser, ["--recipe", "coco_caption", "--output_dir", "out", "--learning_rate", "2e-5"]
    )
    assert (finetune.image_size, finetune.prompt, finetune.num_beams) == (384, "a picture of ", 3)
    assert (training.per_device_train_batch_size, training.num_train_epochs) == (32, 5)
    assert (training.weight_decay, training.max_grad_norm, finetune.weight_decay_all) == (0.05, 0.0, True)
    assert training.learning_rate == 2e-5  # given on the command line: wins over the recipe's 1e-5
    with pytest.raises(ValueError, match="unknown recipe"):
        parse_with_recipe(HfArgumentParser((FinetuneArguments, TrainingArguments)), ["--recipe", "nope"])
    with pytest.raises(ValueError, match="no argument for"):
        parse_with_recipe(HfArgumentParser((FinetuneArguments, TrainingArguments)), ["--recipe", "coco_retrieval"])
