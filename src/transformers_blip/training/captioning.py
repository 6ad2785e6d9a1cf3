"""Caption fine-tuning as the original's `train_caption.py` does it: data, evaluation and result files.

- Training texts are the prompt followed by the cleaned caption (`prompt + pre_caption(caption, max_words)`), and
  the loss skips `[DEC]` and the prompt's tokens, exactly the positions the original masks
  (`CaptionTrainingCollator`, `caption_prompt_length`).
- Evaluation captions every image of a split by beam search from the prompt (3 beams, 5 to 20 tokens by default)
  and scores the captions against the references with the COCO metrics (`CaptionEvaluation`, whose CIDEr picks the
  best checkpoint). Its captions are what the result file holds, in the COCO results format
  `[{"image_id", "caption"}]`, one entry per image (`write_caption_results`).
- Where a run starts: a saved head (ours or transformers' layout), a pretraining run, or an original `.pth`
  (`load_captioner`); transformers' layout carries no label smoothing and no dropout, so those get BLIP's training
  values unless the user sets others (`training_regularisation`). The model learns its prompt's token ids
  (`set_caption_prompt`), so that it masks the prompt in its loss by default, as the original does.
- Evaluation only (the original's `--evaluate`, and NoCaps, whose references stay on its server): the captions of
  the validation and test splits, scored where the splits have references (`evaluation_summary`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..atomic_writes import write_text_atomically
from ..benchmark import build_synthetic_benchmark
from ..configuration_blip import BlipConfig
from ..data import DecodeImages, SkipReport, flatten_captions, load_coco_karpathy, pre_caption
from ..data.hub_datasets import HubDatasetArguments, load_hub_splits
from ..data.loaders import load_nocaps
from ..evaluation import caption_scores
from ..modeling_blip import BlipForConditionalGeneration
from ..processing_blip import decode_captions
from .collators import DecodingCollator, ImageTextCollator
from .finetuning import (
    BLIP_LABEL_SMOOTHING,
    BLIP_TEXT_DROPOUT,
    checkpoint_layout,
    predict_in_shares,
    training_regularisation,
)

logger = logging.getLogger(__name__)

# The original tokenizes training captions with truncation at 40 tokens (models/blip.py).
TRAINING_TEXT_LENGTH = 40
# The COCO file name's number is the image id the COCO results format and the official references use.
_COCO_FILE_ID = re.compile(r"COCO_[a-z]+\d*_0*(\d+)\.jpg$")


def caption_prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Tokens of `prompt` after `[DEC]`: the original's `len(tokenizer(prompt).input_ids) - 1` less `[DEC]`'s
    position, i.e. what `BlipForConditionalGeneration(prompt_length=...)` takes (3 for "a picture of ")."""
    return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def set_caption_prompt(config: BlipConfig, tokenizer: PreTrainedTokenizerBase, prompt: str) -> None:
    """Makes `prompt` the captioner's (`config.prompt`) and gives it the prompt's token ids
    (`config.prompt_token_ids`), with which the model masks the prompt in its loss wherever a text starts with it."""
    config.prompt = prompt
    config.prompt_token_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []


class CaptionTrainingCollator:
    """Batches `{image, caption}` rows (images already decoded to tensors) for training the captioner.

    Each text is `prompt + pre_caption(caption, max_words)`, tokenized with truncation at `max_length` and padded to
    the batch's longest; the batch carries `labels` (the same ids: the model masks pads) and `prompt_length`, so that
    the loss leaves out `[DEC]` and the prompt as the original does.

    Args:
        tokenizer: BLIP's tokenizer (`[CLS] ... [SEP]`; the model puts `[DEC]` in place of `[CLS]`).
        prompt: the text every caption is continued from (`"a picture of "`; `""` for none).
        max_words: words kept per caption by the cleaning (BLIP: 30).
        max_length: tokens per text, prompt included (BLIP: 40).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt: str = "a picture of ",
        max_words: int = 30,
        max_length: int = TRAINING_TEXT_LENGTH,
    ):
        self.prompt = prompt
        self.max_words = max_words
        self.prompt_length = caption_prompt_length(tokenizer, prompt)
        if self.prompt_length + 2 >= max_length:  # [CLS], the prompt, at least one caption token, [SEP]
            raise ValueError(f"the prompt {prompt!r} leaves no room for a caption in max_length={max_length} tokens")
        self.tokenize = ImageTextCollator(
            tokenizer, image_transform=None, max_length=max_length, max_words=None, padding="longest"
        )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        texts = [{**row, "caption": self.prompt + pre_caption(row["caption"], self.max_words)} for row in rows]
        batch = self.tokenize(texts)
        batch["labels"] = batch["input_ids"].clone()
        batch["prompt_length"] = self.prompt_length
        return batch


def caption_training_collator(
    tokenizer: PreTrainedTokenizerBase,
    image_transform: Callable,
    prompt: str,
    max_words: int,
    report: SkipReport | None = None,
) -> DecodingCollator:
    """The training `data_collator`: decodes and augments images in the DataLoader workers (captions kept true under
    flips, broken images skipped and counted in `report`), then `CaptionTrainingCollator`."""
    decode = DecodeImages(image_transform, text_columns=("caption",), report=report)
    return DecodingCollator(decode, CaptionTrainingCollator(tokenizer, prompt, max_words))


@dataclass
class CaptionGeneration:
    """How evaluation captions: the original's beam search from the prompt."""

    prompt: str = "a picture of "
    num_beams: int = 3
    max_length: int = 20
    min_length: int = 5


def result_image_id(row: dict[str, Any]) -> int:
    """The id a result entry names: COCO's own (the number in `COCO_val2014_000000391895.jpg`, as the original
    takes it) for COCO images, the dataset's `image_id` otherwise."""
    image = row.get("image")
    path = image.get("path") if isinstance(image, dict) else None
    match = _COCO_FILE_ID.search(path or "")
    return int(match.group(1)) if match else int(row["image_id"])


def _stack_eval_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": torch.stack([row["image"] for row in rows]), "ids": [row["result_id"] for row in rows]}


class CaptionEvaluation:
    """`task_evaluation` for `BlipFineTuningTrainer`: captions a split `{image, captions, image_id}` by beam search
    and scores it with the COCO metrics (`Bleu_1..4`, `ROUGE_L`, `CIDEr`, `METEOR` on request) plus the original's
    choice of the best epoch, `CIDEr_plus_Bleu_4`.

    The captions of the latest evaluation stay in `self.results` (COCO results format). Under several processes each
    rank captions a contiguous share of the split and the shares are gathered, so that every rank scores all the
    captions and reports the same metrics.

    Args:
        tokenizer: BLIP's tokenizer.
        image_transform: PIL image -> (3, H, W) tensor, `BlipEvalTransform`.
        generation: prompt and beam-search settings.
        batch_size: images per `generate` call.
        meteor: compute METEOR too (a Java process: about 10 s more per evaluation).
        num_workers: DataLoader workers that decode the images.
        report: where images that do not decode are counted; they get no caption and no score.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable,
        generation: CaptionGeneration | None = None,
        batch_size: int = 32,
        meteor: bool = False,
        num_workers: int = 0,
        report: SkipReport | None = None,
    ):
        self.tokenizer = tokenizer
        self.generation = generation or CaptionGeneration()
        self.batch_size = batch_size
        self.meteor = meteor
        self.num_workers = num_workers
        self.collate = DecodingCollator(DecodeImages(image_transform, report=report), _stack_eval_rows)
        self.results: list[dict[str, Any]] = []

    def caption(self, model: BlipForConditionalGeneration, dataset: Dataset) -> list[dict[str, Any]]:
        """`[{"image_id", "caption"}]` for every image of `dataset` that decodes, each image once."""
        # Images undecoded until the workers' `DecodeImages`, which skips and counts a broken one.
        rows = dataset.select_columns(["image", "image_id"]).cast_column("image", ImageFeature(decode=False))
        rows = rows.add_column("result_id", [result_image_id(row) for row in rows])
        return _first_per_image(predict_in_shares(lambda share: self._caption_rows(model, share), rows))

    def _caption_rows(self, model: BlipForConditionalGeneration, rows: Dataset) -> list[dict[str, Any]]:
        loader = DataLoader(rows, self.batch_size, collate_fn=self.collate, num_workers=self.num_workers)
        device = next(model.parameters()).device
        settings = self.generation
        prompt_ids = self.tokenizer(settings.prompt, return_tensors="pt")["input_ids"] if settings.prompt else None
        results = []
        with torch.inference_mode():
            for batch in loader:
                if batch is None:  # every image of the batch was broken
                    continue
                pixel_values = batch["pixel_values"].to(device)
                input_ids = prompt_ids.expand(pixel_values.shape[0], -1).to(device) if prompt_ids is not None else None
                generated = model.generate(
                    pixel_values,
                    input_ids=input_ids,
                    num_beams=settings.num_beams,
                    max_length=settings.max_length,
                    min_length=settings.min_length,
                )
                captions = decode_captions(self.tokenizer, generated, prompt=settings.prompt or None)
                results += [
                    {"image_id": image_id, "caption": caption} for image_id, caption in zip(batch["ids"], captions)
                ]
        return results

    def __call__(self, model: BlipForConditionalGeneration, dataset: Dataset) -> dict[str, float]:
        """The scores of `dataset`'s captions; a split without references (NoCaps) gets only its count of
        `captioned` images, its captions being for the evaluation server."""
        self.results = self.caption(model, dataset)
        if not self.results:
            raise ValueError(f"no image of the evaluation split ({len(dataset)} rows) could be decoded")
        if "captions" not in dataset.column_names:
            return {"captioned": len(self.results)}
        references = _references_by_result_id(dataset)
        predictions = {entry["image_id"]: entry["caption"] for entry in self.results}
        scores = caption_scores(predictions, {key: references[key] for key in predictions}, meteor=self.meteor)
        scores["CIDEr_plus_Bleu_4"] = scores["CIDEr"] + scores["Bleu_4"]
        return scores


def _first_per_image(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per image id, the first, as the original's `save_result(..., remove_duplicate='image_id')`."""
    kept = {}
    for entry in results:
        kept.setdefault(entry["image_id"], entry)
    return list(kept.values())


def _references_by_result_id(dataset: Dataset) -> dict[int, list[str]]:
    rows = dataset.select_columns(["image", "image_id", "captions"]).cast_column("image", ImageFeature(decode=False))
    return {result_image_id(row): row["captions"] for row in rows}


def write_caption_results(results: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """The COCO results file: a JSON list of `{"image_id": int, "caption": str}`, written atomically."""
    write_text_atomically(path, json.dumps(results, indent=1))


CAPTION_SOURCES = ("synthetic", "coco_karpathy", "nocaps")


def load_caption_splits(
    source: str,
    train_file: str | None = None,
    val_file: str | None = None,
    test_file: str | None = None,
    image_root: str | None = None,
    max_words: int = 30,
    synthetic_kwargs: dict[str, Any] | None = None,
    report: SkipReport | None = None,
    with_train: bool = True,
    hub_arguments: HubDatasetArguments | None = None,
) -> tuple[Dataset | None, Dataset, Dataset]:
    """`(train, val, test)`: training pairs `{image, caption, image_id}` and evaluation images
    `{image, captions, image_id}` (`{image, image_id}` for NoCaps, which has no references to score with).

    Args:
        source: `"synthetic"` (the benchmark's "human" split, one row per caption, then its "val" and "test"
            splits), `"coco_karpathy"` (BLIP's `coco_karpathy_{train,val,test}.json`, or Flickr30K's) or
            `"nocaps"` (BLIP's `nocaps_val.json` and `nocaps_test.json`: evaluation only).
        train_file, val_file, test_file: the annotation files.
        image_root: where their relative image paths start.
        synthetic_kwargs: arguments of `build_synthetic_benchmark`.
        with_train: read the training split; `False` for a run that only evaluates (train is then `None`).
        hub_arguments: the `datasets` dataset of `source="hub"` (`--dataset_name` and its columns).
    """
    if source == "hub":
        splits = load_hub_splits(hub_arguments, "caption", max_words, report, with_train)
        return splits["train"], splits["validation"], splits["test"]
    if source == "synthetic":
        benchmark = build_synthetic_benchmark(
            **{"num_web": 1, "num_vqa": 3, "num_nlvr": 1, **(synthetic_kwargs or {})}
        )
        train = flatten_captions(benchmark["human"]).select_columns(["image", "caption", "image_id"])
        return (train if with_train else None), benchmark["val"], benchmark["test"]
    if source not in CAPTION_SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(CAPTION_SOURCES)}")
    if source == "nocaps" and with_train:
        raise ValueError("NoCaps has no training split: evaluate a captioner with --do_train false")
    files = {"--train_file": train_file} if with_train else {}
    files.update({"--val_file": val_file, "--test_file": test_file})
    missing = [name for name, file in files.items() if not file]
    if missing:
        raise ValueError(f"the {source} source needs {', '.join(missing)} (BLIP's annotation files)")
    if source == "nocaps":
        return None, _nocaps_split(val_file, image_root, report), _nocaps_split(test_file, image_root, report)
    train = _karpathy_split(train_file, image_root, max_words, report, "caption") if with_train else None
    val = _karpathy_split(val_file, image_root, max_words, report, "captions")
    return train, val, _karpathy_split(test_file, image_root, max_words, report, "captions")


def _nocaps_split(file: str, image_root: str | None, report: SkipReport | None) -> Dataset:
    split = load_nocaps(file, image_root, report=report)
    if len(split) == 0:
        raise ValueError(f"{file} gave no usable record (NoCaps lists {{'image', 'img_id'}} records)")
    return split


def _karpathy_split(file: str, image_root: str | None, max_words: int, report: SkipReport | None, column: str):
    """One Karpathy file, refused by name when it gives nothing or is of the other layout than its split's."""
    split = load_coco_karpathy(file, image_root, max_words=max_words, report=report)
    if len(split) == 0:
        raise ValueError(f"{file} gave no usable record")
    if column not in split.column_names:
        rule = {
            "caption": "a training file lists one caption per record",
            "captions": "an evaluation file lists each image once with its captions",
        }[column]
        raise ValueError(f"{file} has the wrong layout for its split: {rule}")
    return split


def load_captioner(
    model_name_or_path: str, image_size: int, tokenizer_name_or_path: str | None = None
) -> tuple[BlipForConditionalGeneration, PreTrainedTokenizerBase, str]:
    """The captioner a run starts from and its tokenizer, with the kind of start: `"original"` (a Salesforce `.pth`),
    `"pretraining"` (a saved `BlipForPreTraining`: its decoder, as the original fine-tunes), `"transformers"`
    (transformers' BLIP layout, e.g. the hub's `Salesforce/blip-image-captioning-base`) or `"ours"`.

    A pretraining run or a `.pth` gets ViT position embeddings resized to `image_size` (224 -> 384); a saved head
    keeps its own, interpolated as it runs on other sizes. The tokenizer is read from
    `tokenizer_name_or_path`, else from beside the weights (an original `.pth` has none: give the tokenizer).
    """
    from ..convert.original import load_original_checkpoint
    from ..convert.pretraining import task_head_from_pretraining

    if str(model_name_or_path).endswith((".pth", ".pt")):
        if tokenizer_name_or_path is None:
            raise ValueError(f"{model_name_or_path} holds no tokenizer: pass --tokenizer_name_or_path")
        model, _ = load_original_checkpoint(model_name_or_path, head="captioning", image_size=image_size)
        kind = "original"
    else:
        config_dict, _ = BlipConfig.get_config_dict(model_name_or_path)
        if "BlipForPreTraining" in (config_dict.get("architectures") or []):
            config = BlipConfig.from_pretrained(model_name_or_path)
            config.vision_config.image_size = image_size
            model = task_head_from_pretraining(BlipForConditionalGeneration, model_name_or_path, config=config)
            kind = "pretraining"
        else:
            kind = checkpoint_layout(model_name_or_path)
            # Its ViT position embeddings stay as saved; they are interpolated for other image sizes as it runs.
            model = BlipForConditionalGeneration.from_pretrained(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path or model_name_or_path)
    return model, tokenizer, kind


# Evaluation entries that are not caption scores: the original's pick of the best epoch, and the count of a split
# without references.
_NOT_SCORES = ("CIDEr_plus_Bleu_4", "captioned")


def results_markdown(metrics: dict[str, Any]) -> str:
    """A short `results.md`: the scores of the validation and test splits (of the best epoch, after training)."""
    names = [name for name in {**metrics["val"], **metrics["test"]} if name not in _NOT_SCORES]
    if "evaluated" in metrics:
        origin = f"Evaluation of `{metrics['evaluated']}`, without training."
    else:
        origin = f"Best checkpoint by validation {metrics['metric_for_best_model']}: `{metrics['best_checkpoint']}`."
    lines = ["# Caption fine-tuning", "", origin, ""]
    if names:
        lines += ["| split | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for split in ("val", "test"):
            scores = metrics.get(split) or {}
            cells = [f"{100 * scores[n]:.1f}" if n in scores else "-" for n in names]
            lines.append(f"| {split} | " + " | ".join(cells) + " |")
        lines += ["", "Scores in percent (CIDEr too, as the paper reports it); captions in the COCO results format."]
    else:
        lines.append(
            "The splits have no references to score with (NoCaps keeps them on its evaluation server): the captions,"
            " in the COCO results format, are the result."
        )
    return "\n".join(lines) + "\n"


_TIMINGS = ("runtime", "samples_per_second", "steps_per_second")


def _scores(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """`metrics` of one evaluation without their prefix and without Trainer's timings."""
    scores = {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}
    return {key: value for key, value in scores.items() if key not in _TIMINGS}


def run_summary(
    state: Any, metric_for_best_model: str, test_metrics: dict[str, float], generation: CaptionGeneration
) -> dict[str, Any]:
    """What `metrics.json` holds after training: the best checkpoint, its validation scores (from Trainer's
    `state.log_history`), the test scores and the generation settings."""
    best = state.best_model_checkpoint
    best_step = int(best.rsplit("-", 1)[1]) if best else None
    val = {}
    for entry in state.log_history:
        if entry.get("step") == best_step and f"eval_{metric_for_best_model}" in entry:
            val = _scores(entry, "eval_")
    return {
        "best_checkpoint": best,
        "metric_for_best_model": metric_for_best_model,
        "val": val,
        "test": _scores(test_metrics, "test_"),
        "generation": asdict(generation),
    }


def evaluation_summary(
    model_name_or_path: str,
    val_metrics: dict[str, float],
    test_metrics: dict[str, float],
    generation: CaptionGeneration,
) -> dict[str, Any]:
    """What `metrics.json` holds when a run only evaluates: the model, each split's scores (or, without references,
    its count of captioned images) and the generation settings."""
    return {
        "evaluated": model_name_or_path,
        "val": _scores(val_metrics, "val_"),
        "test": _scores(test_metrics, "test_"),
        "generation": asdict(generation),
    }


def write_run_outputs(
    output_dir: str | os.PathLike, summary: dict[str, Any], results: dict[str, list[dict[str, Any]]]
) -> None:
    """`metrics.json`, `results.md` and each split's captions `{split}_results.json` (`results` by split name),
    each written atomically."""
    write_text_atomically(os.path.join(output_dir, "metrics.json"), json.dumps(summary, indent=1))
    write_text_atomically(os.path.join(output_dir, "results.md"), results_markdown(summary))
    for split, captions in results.items():
        write_caption_results(captions, os.path.join(output_dir, f"{split}_results.json"))


__all__ = [
    "BLIP_LABEL_SMOOTHING",
    "BLIP_TEXT_DROPOUT",
    "CaptionEvaluation",
    "CaptionGeneration",
    "CAPTION_SOURCES",
    "CaptionTrainingCollator",
    "caption_prompt_length",
    "caption_training_collator",
    "evaluation_summary",
    "load_caption_splits",
    "load_captioner",
    "result_image_id",
    "results_markdown",
    "run_summary",
    "set_caption_prompt",
    "training_regularisation",
    "write_caption_results",
    "write_run_outputs",
]
