"""Glue between BLIP's pretraining model and `transformers.Trainer`.

- `MomentumUpdateCallback`: the EMA step of the momentum encoders once per optimizer step (not per micro-batch), and
  the distillation alpha read from the global step, so both are right under gradient accumulation and after a resume.
- `ImageTextCollator`: rows of `{image, caption[, image_id]}` to `pixel_values`, fixed-length `input_ids` and
  `attention_mask` (fixed, so that ranks can exchange texts for hard negatives), and `image_ids`.
- `DecodingCollator`: robust image decoding and augmentation in the DataLoader workers, before `ImageTextCollator`.
- `pretraining_config`, `load_pretraining_pairs`, `with_caption_lengths`, `optimizer_steps_per_epoch`: the model
  sizes, data sources and input pipeline of `pretrain.py`.
- `BlipPreTrainingTrainer`: a `Trainer` that also logs the ITC, ITM and LM losses, alpha and the temperature.
- `itc_retrieval_recall`: recall@K of image-text retrieval by ITC similarity on held-out pairs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset, concatenate_datasets
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from .configuration_blip import BlipConfig, BlipTextConfig, BlipVisionConfig
from .data import (
    DecodeImages,
    SkippingCollator,
    build_synthetic_benchmark,
    flatten_captions,
    load_caption_json,
    load_coco_karpathy,
    load_image_folder,
    load_parquet,
    load_webdataset,
    pre_caption,
)

LOGGED_LOSSES = ("loss_itc", "loss_itm", "loss_lm")


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


class ImageTextCollator:
    """Batches image-text rows for [`BlipForPreTraining`] (and the retrieval recipe, with image ids).

    Args:
        tokenizer: a BERT-style tokenizer (`[CLS] ... [SEP]`); the model puts `[ENC]` / `[DEC]` in place of `[CLS]`.
        image_transform: PIL image -> (3, H, W) tensor. A transform with a `with_text(image, text)` method (such as
            `BlipTrainTransform`) is given the caption too, so that a horizontal flip can keep "left"/"right" true.
            `None` when the rows already hold tensors (a dataset transformed by `DecodeImages`).
        max_length: texts are truncated to this many tokens (30 in BLIP's pretraining).
        padding: `"max_length"` pads every text to `max_length`; `"longest"` pads to the longest text of the batch,
            which saves much of the text encoders' work when batches group texts of similar length
            (`TrainingArguments(group_by_length=True)` with a `length` column).
        max_words: captions are cleaned with `pre_caption(text, max_words)` first (`None`: used as they are).
        image_column, text_column: column names of the rows.
        image_id_column: if set, the rows' image ids are passed as `image_ids` (all captions of an image become
            positives of each other).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Any], torch.Tensor] | None,
        max_length: int = 30,
        max_words: int | None = 30,
        image_column: str = "image",
        text_column: str = "caption",
        image_id_column: str | None = None,
        padding: str = "max_length",
    ):
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.max_length = max_length
        self.padding = padding
        self.max_words = max_words
        self.image_column = image_column
        self.text_column = text_column
        self.image_id_column = image_id_column

    def _transform(self, image: Any, text: str) -> tuple[torch.Tensor, str]:
        if isinstance(image, torch.Tensor):
            return image, text
        if hasattr(self.image_transform, "with_text"):
            return self.image_transform.with_text(image, text)
        return self.image_transform(image), text

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values, texts = [], []
        for row in rows:
            text = row[self.text_column]
            if self.max_words is not None:
                text = pre_caption(text, self.max_words)
            pixels, text = self._transform(row[self.image_column], text)
            pixel_values.append(pixels)
            texts.append(text)
        encoded = self.tokenizer(
            texts, padding=self.padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {
            "pixel_values": torch.stack(pixel_values),  # (B, 3, H, W)
            "input_ids": encoded["input_ids"],  # (B, L), L = max_length or the longest text
            "attention_mask": encoded["attention_mask"],
        }
        if self.image_id_column is not None:
            batch["image_ids"] = torch.tensor([int(row[self.image_id_column]) for row in rows], dtype=torch.long)
        return batch


# Encoder sizes by name, with their pretraining defaults: the paper's ViT-B/16 and ViT-L/16 with BERT-base, and a
# tiny model that learns the synthetic benchmark on a laptop CPU in minutes. The tiny run trains from scratch for a
# thousand steps or so, which changes three defaults. Momentum 0.9, so that the momentum encoders keep up. No queue:
# with keys from fast-moving momentum encoders the model learns to tell this step's keys from the queued ones instead
# of matching images with texts (the queue pays off with the slow momentum and the long runs of real pretraining).
# A temperature of at most 0.1: while the features cannot yet tell pairs apart the learned temperature climbs, which
# weakens ITC's gradients for hundreds of steps.
MODEL_SIZES = {
    "tiny": {
        "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
        "text": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "patch_size": 8,
        "embed_dim": 64,
        "pretraining": {"queue_size": 0, "momentum": 0.9, "itc_temperature_max": 0.1},
    },
    "base": {
        "vision": {},
        "text": {},
        "patch_size": 16,
        "embed_dim": 256,
        "pretraining": {"queue_size": 57600, "momentum": 0.995},
    },
    "large": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text": {},
        "patch_size": 16,
        "embed_dim": 256,
        "pretraining": {"queue_size": 57600, "momentum": 0.995},
    },
}


def pretraining_config(
    model_size: str, image_size: int, token_kwargs: dict[str, int], **pretraining_fields
) -> BlipConfig:
    """A `BlipConfig` of one of `MODEL_SIZES` for `image_size` pixels, with the tokenizer's ids (`token_kwargs`, from
    `text_config_token_kwargs`) and pretraining fields (queue_size, momentum, alpha, ...); fields given as `None`
    take the size's defaults."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {model_size!r}")
    size = MODEL_SIZES[model_size]
    vision_config = BlipVisionConfig(image_size=image_size, patch_size=size["patch_size"], **size["vision"])
    text_config = BlipTextConfig(**size["text"], **token_kwargs)
    fields = {
        **size["pretraining"],
        **{name: value for name, value in pretraining_fields.items() if value is not None},
    }
    return BlipConfig(text_config=text_config, vision_config=vision_config, embed_dim=size["embed_dim"], **fields)


PAIR_COLUMNS = ["image", "caption", "image_id"]


def load_pretraining_pairs(
    source: str,
    files: Sequence[str] = (),
    image_root: str | None = None,
    synthetic_kwargs: dict[str, Any] | None = None,
) -> tuple[Dataset | IterableDataset, Dataset | None]:
    """Image-text pairs to pretrain on and, for the synthetic benchmark, held-out images with their captions.

    Args:
        source: `"synthetic"` (the "human" split, one row per caption, followed by the noisy "web" split; held out:
            the "test" split), `"coco_karpathy"` (training annotation files), `"caption_json"` (BLIP's pretraining
            lists), `"image_folder"` (a folder with `metadata.jsonl`), `"parquet"`, or `"webdataset"` (tar shards,
            streamed: give `max_steps`).
        files: the annotation files, folder, parquet files or shards of a real source.
        image_root: where the relative image paths of the JSON formats start.
        synthetic_kwargs: arguments of `build_synthetic_benchmark` (its VQA, NLVR2 and validation splits are kept
            minimal unless given).

    Returns:
        `(train, held_out)`. `train` has `image`, `caption` and, where the source has them, `image_id`.
    """
    if source == "synthetic":
        benchmark = build_synthetic_benchmark(
            **{"num_val": 1, "num_vqa": 3, "num_nlvr": 1, **(synthetic_kwargs or {})}
        )
        human = flatten_captions(benchmark["human"]).select_columns(PAIR_COLUMNS)
        web = benchmark["web"].select_columns(PAIR_COLUMNS)
        return concatenate_datasets([human, web]), benchmark["test"]
    if not files:
        raise ValueError(f"the {source!r} source needs files (annotation files, a folder, parquet files or shards)")
    if source == "coco_karpathy":
        return concatenate_datasets([load_coco_karpathy(file, image_root) for file in files]), None
    loaders = {
        "caption_json": lambda: load_caption_json(files, image_root),
        "image_folder": lambda: load_image_folder(files[0]),
        "parquet": lambda: load_parquet(files),
        "webdataset": lambda: load_webdataset(files),
    }
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; choose synthetic, coco_karpathy or one of {sorted(loaders)}")
    return loaders[source](), None


class DecodingCollator:
    """Decodes and transforms the images of a list of rows, drops the rows whose image is broken, batches the rest.

    As the DataLoader's `collate_fn` it runs in the worker processes. Decoding here rather than in a dataset
    transform keeps the dataset's columns plain, so that Trainer can read a `length` column to group texts of
    similar length (`train_sampling_strategy="group_by_length"`).

    Args:
        decode: a `DecodeImages`; it counts broken images in its `SkipReport` and keeps captions true under flips.
        collate: batches the decoded rows, e.g. an `ImageTextCollator` without an image transform.
    """

    def __init__(self, decode: DecodeImages, collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]):
        self.decode = decode
        self.skipping_collate = SkippingCollator(collate, image_columns=decode.image_columns)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor] | None:
        columns = self.decode({name: [row[name] for row in rows] for name in rows[0]})
        decoded_rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        return self.skipping_collate(decoded_rows)


def with_caption_lengths(dataset: Dataset, text_column: str = "caption") -> Dataset:
    """Adds a `length` column (words per caption), which `group_by_length` batching sorts by."""

    def count_words(batch: dict[str, list]) -> dict[str, list[int]]:
        return {"length": [len(text.split()) for text in batch[text_column]]}

    # Schema out: the input columns plus `length` (int).
    return dataset.map(count_words, batched=True, desc="Counting caption words")


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


def optimizer_steps_per_epoch(dataset: Dataset | IterableDataset, args: TrainingArguments) -> int:
    """Optimizer steps in one pass over `dataset` on all ranks (`max_steps` for a stream of unknown length)."""
    if isinstance(dataset, IterableDataset):
        return max(args.max_steps, 1)
    samples_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return max(math.ceil(len(dataset) / samples_per_step), 1)


class BlipPreTrainingTrainer(Trainer):
    """`Trainer` for [`BlipForPreTraining`]: adds the momentum callback and logs each loss, alpha and temperature.

    The logged `loss_itc`, `loss_itm` and `loss_lm` are means over the micro-batches since the last log and over all
    ranks, like Trainer's own `loss`.

    A collator may return `None` for a batch whose every sample was unreadable (`SkippingCollator`,
    `DecodingCollator`; the samples are counted in their `SkipReport`). On one process the batch is passed over and
    the next one read in its place (`empty_batches` counts them). Under several processes a rank cannot pass a batch
    over without leaving the others waiting in the gradient all-reduce, so it stops with an error that says so.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not any(isinstance(callback, MomentumUpdateCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(MomentumUpdateCallback())
        self._loss_sums: torch.Tensor | None = None  # (3,) sums of the ITC, ITM, LM losses since the last log
        self._loss_count = 0
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

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs)
        if model.training:
            parts = torch.stack([outputs[name].detach().float() for name in LOGGED_LOSSES])
            self._loss_sums = parts if self._loss_sums is None else self._loss_sums + parts
            self._loss_count += 1
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Trainer calls `log` with the training loss on every rank at once, so the reduction below is collective.
        if "loss" in logs and self._loss_count > 0:
            means = self.accelerator.reduce(self._loss_sums / self._loss_count, reduction="mean")
            logs.update({name: round(value, 4) for name, value in zip(LOGGED_LOSSES, means.tolist())})
            model = unwrap_model(self.model)
            logs["alpha"] = model.distillation_alpha()
            logs["temperature"] = round(model.temp.item(), 5)
            self._loss_sums, self._loss_count = None, 0
        super().log(logs, start_time)


@torch.no_grad()
def itc_features(
    model: nn.Module,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ITC features of images (I, E) and texts (T, E) from the online encoders, in batches."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    image_feats, text_feats = [], []
    for start in range(0, pixel_values.shape[0], batch_size):
        image_embeds = model.vision_model(pixel_values[start : start + batch_size].to(device)).last_hidden_state
        image_feats.append(F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1))
    for start in range(0, input_ids.shape[0], batch_size):
        text_embeds = model.text_encoder(
            input_ids[start : start + batch_size].to(device),
            attention_mask=attention_mask[start : start + batch_size].to(device),
            mode="text",
        ).last_hidden_state
        text_feats.append(F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1))
    return torch.cat(image_feats), torch.cat(text_feats)


def recall_at_k(similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Retrieval recall@K in percent from an image-text similarity (I, T) and each text's image index (T,).

    Image-to-text counts an image as found when any of its texts ranks within K; text-to-image, when its image does.
    """
    num_images = similarity.shape[0]
    # Rank of each text's own image among all images: how many images score strictly higher.
    own_image_score = similarity[text_to_image, torch.arange(similarity.shape[1])]  # (T,)
    t2i_rank = (similarity > own_image_score[None, :]).sum(dim=0)  # (T,)
    # For each image, the best rank among its texts.
    own_text = text_to_image[None, :] == torch.arange(num_images)[:, None]  # (I, T)
    best_own_score = similarity.masked_fill(~own_text, float("-inf")).max(dim=1).values  # (I,)
    i2t_rank = (similarity.masked_fill(own_text, float("-inf")) > best_own_score[:, None]).sum(dim=1)  # (I,)
    metrics = {}
    for k in ks:
        metrics[f"txt_r{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        metrics[f"img_r{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return metrics


def itc_retrieval_recall(
    model: nn.Module,
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase,
    image_transform: Callable[[Any], torch.Tensor],
    max_length: int = 30,
    max_words: int = 30,
    ks: Sequence[int] = (1, 5, 10),
    image_column: str = "image",
    captions_column: str = "captions",
) -> dict[str, float]:
    """Recall@K (percent) of ITC retrieval on rows `{image, captions: list[str]}`, plus the recall@1 of chance.

    Keys: `txt_r{k}` (image-to-text), `img_r{k}` (text-to-image) and `chance_r1`.
    """
    was_training = unwrap_model(model).training
    unwrap_model(model).eval()
    pixel_values, texts, text_to_image = [], [], []
    for image_index, row in enumerate(dataset):
        pixel_values.append(image_transform(row[image_column]))
        for caption in row[captions_column]:
            texts.append(pre_caption(caption, max_words))
            text_to_image.append(image_index)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    image_feat, text_feat = itc_features(
        model, torch.stack(pixel_values), encoded["input_ids"], encoded["attention_mask"]
    )
    unwrap_model(model).train(was_training)
    metrics = recall_at_k((image_feat @ text_feat.t()).cpu(), torch.tensor(text_to_image), ks)
    # A random ranking puts one of an image's n texts first with probability n / T, its image first with 1 / I:
    # both are 1 / I when every image has the same number of texts.
    metrics["chance_r1"] = 100.0 / len(pixel_values)
    return metrics


__all__ = [
    "MODEL_SIZES",
    "BlipPreTrainingTrainer",
    "ImageTextCollator",
    "DecodingCollator",
    "MomentumUpdateCallback",
    "check_processes_train_together",
    "itc_features",
    "itc_retrieval_recall",
    "load_pretraining_pairs",
    "optimizer_steps_per_epoch",
    "pretraining_config",
    "recall_at_k",
    "unwrap_model",
    "with_caption_lengths",
]
