"""NLVR2 fine-tuning as the original's `train_nlvr.py` does it: data, pair batches, predictions, accuracy, results.

- Data: the synthetic benchmark's `nlvr_train` / `nlvr_test`, or BLIP's NLVR2 JSON (`load_nlvr`: train, dev, test).
  The original validates on dev every epoch and keeps the best epoch; without dev files a share of the training
  pairs is held out for it (`held_out_split`).
- Batches (`NlvrCollator`): both images of a pair as `(B, 2, 3, H, W)`, the statement, the label. In training a
  pair is mirrored as one picture with probability 0.5 (`mirror_pair`: the images swap and flip, "left" and
  "right" swap in the statement), which keeps every statement true; each image is then cropped and augmented
  without a flip of its own.
- Predictions (`predict_pairs`) and the result file (`write_nlvr_results`): one `{"pair", "sentence",
  "prediction", "label"}` per pair, in the split's order. Under several processes each rank classifies a contiguous
  share of the split and every rank gets all the predictions (`predict_in_shares`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from datasets import Dataset
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..atomic_writes import write_text_atomically
from ..benchmark import build_synthetic_benchmark
from ..data import MAX_WORDS, BlipEvalTransform, DecodeImages, SkipReport, load_nlvr, mirror_pair
from ..data.hub_datasets import HubDatasetArguments, load_hub_splits
from ..evaluation.vqa_accuracy import nlvr_accuracy
from .finetuning import predict_in_shares
from .vqa import held_out_split

# The prediction of a pair whose images do not decode: never equal to a label, so it counts as wrong.
UNREADABLE_PAIR = -1
IMAGE_COLUMNS = ("image0", "image1")


def load_nlvr_splits(
    source: str,
    train_files: Sequence[str] = (),
    validation_files: Sequence[str] = (),
    test_files: Sequence[str] = (),
    image_root: str | None = None,
    validation_share: float = 0.0,
    seed: int = 0,
    synthetic_kwargs: dict[str, Any] | None = None,
    report: SkipReport | None = None,
    max_words: int = MAX_WORDS["nlvr"],
    hub_arguments: HubDatasetArguments | None = None,
) -> dict[str, Dataset | None]:
    """`{"train", "validation", "test"}` of an NLVR2 run; validation is `None` when there is none.

    `source="synthetic"` reads the benchmark's `nlvr_train` and `nlvr_test`; `"nlvr_json"` BLIP's `nlvr_train.json`,
    `nlvr_dev.json` (validation) and `nlvr_test.json`. Without validation files, `validation_share` of the training
    pairs are held out for validation (0: none). Statements of the JSON files keep `max_words` words. `"hub"` reads
    the `datasets` dataset of `hub_arguments` (`load_hub_splits`), held out of in the same way when it has no
    validation split.
    """
    if source == "hub":
        splits = load_hub_splits(hub_arguments, "nlvr", max_words, report)
        train, validation, test = splits["train"], splits["validation"], splits["test"]
    elif source == "synthetic":
        empty = {"num_human": 0, "num_web": 0, "num_val": 0, "num_test": 0, "num_vqa": 1, "num_vqa_test": 1}
        benchmark = build_synthetic_benchmark(**{**empty, **(synthetic_kwargs or {})})
        train, validation, test = benchmark["nlvr_train"], None, benchmark["nlvr_test"]
    elif source == "nlvr_json":
        if not train_files or not test_files or image_root is None:
            raise ValueError("the nlvr_json source needs --train_files, --test_files and --image_root")

        def read(files: Sequence[str]) -> Dataset:
            return load_nlvr(list(files), image_root, max_words=max_words, report=report)

        train, test = read(train_files), read(test_files)
        validation = read(validation_files) if validation_files else None
    else:
        raise ValueError(f"unknown NLVR2 source {source!r}: synthetic or nlvr_json")
    if validation is None and validation_share > 0:
        train, validation = held_out_split(train, validation_share, seed)
    return {"train": train, "validation": validation, "test": test}


class NlvrCollator:
    """Batches NLVR2 rows (decoded PIL images) for [`BlipForVisualReasoning`].

    Args:
        tokenizer: BLIP's tokenizer; the model puts `[ENC]` in place of `[CLS]`.
        image_transform: PIL image -> (3, H, W) tensor, applied to each image of a pair; it must not flip on its
            own (`BlipTrainTransform(allow_flip=False)`), as mirroring is done here, for the pair as a whole.
        mirror_probability: chance that a pair is mirrored (0.5 in training, 0 in evaluation).
        with_labels: batch the labels too.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_transform: Callable[[Image.Image], torch.Tensor],
        mirror_probability: float = 0.0,
        with_labels: bool = True,
    ):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.mirror_probability = mirror_probability
        self.with_labels = with_labels

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs, sentences = [], []
        for row in rows:
            image0, image1, sentence = row["image0"], row["image1"], row["sentence"]
            # torch's generator: seeded per DataLoader worker and epoch, so a resumed run draws the same mirrors.
            if self.mirror_probability > 0 and torch.rand(()).item() < self.mirror_probability:
                image0, image1, sentence = mirror_pair(image0, image1, sentence)
            pairs.append(torch.stack([self.image_transform(image0), self.image_transform(image1)]))
            sentences.append(sentence)
        encoded = self.tokenizer(sentences, padding="longest", return_tensors="pt")
        batch = {
            "pixel_values": torch.stack(pairs),  # (B, 2, 3, H, W)
            "input_ids": encoded["input_ids"],  # (B, L)
            "attention_mask": encoded["attention_mask"],
        }
        if self.with_labels:
            batch["labels"] = torch.tensor([int(row["label"]) for row in rows])  # (B,)
        return batch


def decode_pairs(report: SkipReport | None = None) -> DecodeImages:
    """Decodes both images of each pair to RGB PIL images (transformed later, pair by pair, by `NlvrCollator`)."""
    return DecodeImages(None, image_columns=IMAGE_COLUMNS, report=report)


@torch.no_grad()
def predict_pairs(
    model, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, image_size: int, batch_size: int = 64,
    report: SkipReport | None = None,
) -> list[int]:  # fmt: skip
    """Predicted label (1 true, 0 false) of every pair of `dataset`, in order; `UNREADABLE_PAIR` where an image of
    the pair does not decode. Under several processes each rank classifies its share and all get every label."""
    return predict_in_shares(lambda share: _classify(model, share, tokenizer, image_size, batch_size, report), dataset)


def _classify(
    model, dataset: Dataset, tokenizer: PreTrainedTokenizerBase, image_size: int, batch_size: int,
    report: SkipReport | None,
) -> list[int]:  # fmt: skip
    device = next(model.parameters()).device
    decode = decode_pairs(report)
    collate = NlvrCollator(tokenizer, BlipEvalTransform(image_size), with_labels=False)
    predictions: list[int] = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        columns = decode({"image0": rows["image0"], "image1": rows["image1"], "sentence": rows["sentence"]})
        decoded = [dict(zip(columns, values)) for values in zip(*columns.values())]
        readable = [index for index, row in enumerate(decoded) if row["image0"] is not None]
        chunk = [UNREADABLE_PAIR] * len(decoded)
        if readable:
            batch = {name: tensor.to(device) for name, tensor in collate([decoded[i] for i in readable]).items()}
            for index, label in zip(readable, model(**batch).logits.argmax(dim=-1).tolist()):
                chunk[index] = label
        predictions.extend(chunk)
    return predictions


def nlvr_evaluation(
    tokenizer: PreTrainedTokenizerBase, image_size: int, batch_size: int = 64, report: SkipReport | None = None
) -> Callable[[Any, Dataset], dict[str, float]]:
    """The `task_evaluation` of `BlipFineTuningTrainer`: NLVR2 accuracy, in percent."""

    def evaluate(model, dataset: Dataset) -> dict[str, float]:
        predictions = predict_pairs(model, dataset, tokenizer, image_size, batch_size, report)
        return nlvr_accuracy(predictions, dataset["label"])

    return evaluate


def write_nlvr_results(predictions: Sequence[int], dataset: Dataset, path: str | os.PathLike) -> None:
    """One `{"pair": index, "sentence", "prediction", "label"}` per pair of `dataset`, in its order."""
    results = [
        {"pair": index, "sentence": sentence, "prediction": int(prediction), "label": int(label)}
        for index, (sentence, prediction, label) in enumerate(zip(dataset["sentence"], predictions, dataset["label"]))
    ]
    write_text_atomically(path, json.dumps(results))


def nlvr_texts(dataset: Dataset) -> list[str]:
    """The statements of an NLVR2 split: the corpus a fresh tokenizer is trained on."""
    return list(dataset["sentence"])


__all__ = [
    "IMAGE_COLUMNS",
    "UNREADABLE_PAIR",
    "NlvrCollator",
    "decode_pairs",
    "load_nlvr_splits",
    "nlvr_evaluation",
    "nlvr_texts",
    "predict_pairs",
    "write_nlvr_results",
]
