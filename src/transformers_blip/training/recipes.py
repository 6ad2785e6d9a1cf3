"""The original's training configurations as named presets (`--recipe NAME`), every value still overridable.

Each preset holds the values of one of salesforce/BLIP's `configs/*.yaml` under the argument names of our scripts:
`learning_rate` is the original's `init_lr`, `per_device_train_batch_size` its per-GPU `batch_size` (the original
ran on 8 GPUs: the same global batch on fewer is `gradient_accumulation_steps`), `num_train_epochs` its
`max_epoch`; `max_grad_norm=0` is its absence of clipping and `weight_decay_all` its decay of every parameter.
Where the paper and the code disagree, the code's value is kept, and the note says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

# The original's AdamW: weight decay 0.05 on every parameter (biases and norms too), no gradient clipping.
_ORIGINAL_OPTIMISATION = {"weight_decay": 0.05, "weight_decay_all": True, "max_grad_norm": 0.0}

RECIPES: dict[str, dict[str, Any]] = {
    # configs/pretrain.yaml. The paper (section 4.1) decays by 0.85 per epoch; the released config by 0.9, kept here.
    "pretrain_base": {
        "model_size": "base",
        "image_size": 224,
        "per_device_train_batch_size": 75,
        "num_train_epochs": 20,
        "learning_rate": 3e-4,
        "lr_schedule": "step_decay_with_warmup",
        "min_lr": 1e-6,
        "warmup_lr": 1e-6,
        "warmup_steps": 3000,
        "lr_decay_rate": 0.9,
        "queue_size": 57600,
        "alpha": 0.4,
        "max_words": 30,
        **_ORIGINAL_OPTIMISATION,
    },
    # The paper's ViT-L values (section 4.1): a peak rate of 2e-4, the rest as the base config; stochastic depth 0.1,
    # which the original's `create_vit` gives every ViT-L.
    "pretrain_large": {
        "model_size": "large",
        "image_size": 224,
        "drop_path_rate": 0.1,
        "per_device_train_batch_size": 75,
        "num_train_epochs": 20,
        "learning_rate": 2e-4,
        "lr_schedule": "step_decay_with_warmup",
        "min_lr": 1e-6,
        "warmup_lr": 1e-6,
        "warmup_steps": 3000,
        "lr_decay_rate": 0.9,
        "queue_size": 57600,
        "alpha": 0.4,
        "max_words": 30,
        **_ORIGINAL_OPTIMISATION,
    },
    # configs/caption_coco.yaml
    "coco_caption": {
        "image_size": 384,
        "per_device_train_batch_size": 32,
        "num_train_epochs": 5,
        "learning_rate": 1e-5,
        "lr_schedule": "epoch_cosine",
        "min_lr": 0.0,
        "prompt": "a picture of ",
        "num_beams": 3,
        "max_length": 20,
        "min_length": 5,
        "max_words": 30,
        **_ORIGINAL_OPTIMISATION,
    },
    # configs/nocaps.yaml: evaluation only, of a COCO-fine-tuned captioner.
    "nocaps": {
        "image_size": 384,
        "per_device_eval_batch_size": 32,
        "prompt": "a picture of ",
        "num_beams": 3,
        "max_length": 20,
        "min_length": 5,
    },
    # configs/retrieval_coco.yaml
    "coco_retrieval": {
        "image_size": 384,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 64,
        "num_train_epochs": 6,
        "learning_rate": 1e-5,
        "lr_schedule": "epoch_cosine",
        "min_lr": 0.0,
        "queue_size": 57600,
        "alpha": 0.4,
        "k_test": 256,
        "negative_all_rank": True,
        "vision_gradient_checkpointing_layers": 4,
        "max_words": 30,
        **_ORIGINAL_OPTIMISATION,
    },
    # configs/retrieval_flickr.yaml
    "flickr_retrieval": {
        "image_size": 384,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 64,
        "num_train_epochs": 6,
        "learning_rate": 1e-5,
        "lr_schedule": "epoch_cosine",
        "min_lr": 0.0,
        "queue_size": 57600,
        "alpha": 0.4,
        "k_test": 128,
        "negative_all_rank": False,
        "vision_gradient_checkpointing_layers": 4,
        "max_words": 30,
        **_ORIGINAL_OPTIMISATION,
    },
    # configs/vqa.yaml: VQA v2 train + val and Visual Genome QA, answers ranked among the candidate list.
    "vqa": {
        "image_size": 480,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 32,
        "num_train_epochs": 10,
        "learning_rate": 2e-5,
        "lr_schedule": "epoch_cosine",
        "min_lr": 0.0,
        "k_test": 128,
        "inference": "rank",
        "max_words": 50,
        **_ORIGINAL_OPTIMISATION,
    },
    # configs/nlvr.yaml
    "nlvr2": {
        "image_size": 384,
        "per_device_train_batch_size": 16,
        "per_device_eval_batch_size": 64,
        "num_train_epochs": 15,
        "learning_rate": 3e-5,
        "lr_schedule": "epoch_cosine",
        "min_lr": 0.0,
        "max_words": 40,
        **_ORIGINAL_OPTIMISATION,
    },
}


def recipe_defaults(name: str, known_arguments: Sequence[str]) -> dict[str, Any]:
    """The values of preset `name`, checked against the `dest` names of the parser that will take them: a value the
    script has no argument for is an error (a preset for another script), never dropped."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    unknown = sorted(set(RECIPES[name]) - set(known_arguments))
    if unknown:
        raise ValueError(
            f"recipe {name!r} sets {unknown}, which this script has no argument for: a recipe of another task?"
        )
    return dict(RECIPES[name])


def parse_with_recipe(parser: argparse.ArgumentParser, args: Sequence[str] | None = None) -> tuple:
    """`parser.parse_args_into_dataclasses(args)` (an `HfArgumentParser`) with a `--recipe NAME` preset applied as
    the defaults, so that every value the command line gives still wins over the preset's."""
    recipe_parser = argparse.ArgumentParser(add_help=False)
    recipe_parser.add_argument("--recipe", default=None)
    known, _ = recipe_parser.parse_known_args(args)
    if known.recipe is not None:
        destinations = {action.dest for action in parser._actions}
        parser.set_defaults(**recipe_defaults(known.recipe, destinations))
    return parser.parse_args_into_dataclasses(args)


__all__ = ["RECIPES", "parse_with_recipe", "recipe_defaults"]
