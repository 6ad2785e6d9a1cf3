"""Writing a converted model: the checks a conversion must pass before anything is written, and the atomic write.

    model, report = load_original_checkpoint("model_base_caption_capfilt_large.pth")
    print(report.summary())
    save_original_conversion(model, report, "blip-captioning", vocab_file="vocab.txt")

`training_scripts/convert_original_checkpoint.py` and `blip convert` both write through here. The output directory
is staged under a temporary name and renamed into place (see `atomic_writes.atomic_directory`), so a conversion that
fails or is killed leaves nothing half written.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..atomic_writes import atomic_directory
from ..modeling_blip import BlipPreTrainedModel
from ..processing_blip import BlipImageTextProcessor, build_processor, build_tokenizer
from .original import ConversionReport
from .transformers_layout import save_in_transformers_layout

REPORT_NAME = "conversion_report.json"


class IncompleteConversionError(ValueError):
    """A conversion dropped checkpoint tensors it did not expect to, or left model tensors missing (random)."""


def check_complete(report: ConversionReport) -> None:
    """Raises `IncompleteConversionError` unless every tensor was accounted for (see `ConversionReport.summary`)."""
    if not report.is_complete:
        raise IncompleteConversionError(
            f"{len(report.dropped_unexpected)} tensors dropped unexpectedly and {len(report.missing)} missing "
            "(listed above); nothing written"
        )


def processor_for_vocabulary(vocab_file: str | os.PathLike, model: BlipPreTrainedModel) -> BlipImageTextProcessor:
    """BLIP's processor over a BERT `vocab.txt`, refused (ValueError naming the file) unless its vocabulary, with
    `[DEC]` and `[ENC]` added, is exactly the size of the model's: another vocabulary would decode wrong tokens."""
    try:
        tokenizer = build_tokenizer(vocab_file=str(vocab_file))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the vocab file: {error}") from error  # `error` names the file
    vocab_size = model.config.text_config.vocab_size
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"vocab file {vocab_file} gives {len(tokenizer)} tokens with [DEC] and [ENC], the model has {vocab_size}: "
            "not the vocabulary this checkpoint was trained with"
        )
    return build_processor(tokenizer, image_size=model.config.vision_config.image_size)


def save_model_directory(
    model: BlipPreTrainedModel,
    output: str | os.PathLike,
    processor: Any = None,
    report: ConversionReport | None = None,
    transformers_layout: bool = False,
    overwrite: bool = False,
) -> None:
    """Writes `model` (our layout, or transformers' BLIP layout), its processor and its conversion report into
    `output`, atomically. A non-empty `output` raises FileExistsError unless `overwrite`; a head transformers' BLIP
    has no counterpart of raises ValueError when `transformers_layout`."""
    with atomic_directory(output, overwrite=overwrite) as staging:
        if transformers_layout:
            save_in_transformers_layout(model, staging)
        else:
            model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)
        if report is not None:
            (staging / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")


def save_original_conversion(
    model: BlipPreTrainedModel,
    report: ConversionReport,
    output: str | os.PathLike,
    vocab_file: str | os.PathLike | None = None,
    allow_partial: bool = False,
    transformers_layout: bool = False,
    overwrite: bool = False,
) -> None:
    """Writes what `load_original_checkpoint` returned into the model directory `output`, with `REPORT_NAME` and,
    given `vocab_file`, the processor; nothing is written when a check fails.

    Raises:
        IncompleteConversionError: tensors were dropped unexpectedly or are missing, unless `allow_partial`.
        ValueError: `vocab_file` cannot be read or is not the model's vocabulary; or see `save_model_directory`.
        FileExistsError: `output` is not empty and not `overwrite`.
    """
    if not allow_partial:
        check_complete(report)
    processor = processor_for_vocabulary(vocab_file, model) if vocab_file else None
    save_model_directory(model, output, processor, report, transformers_layout, overwrite)


__all__ = [
    "REPORT_NAME",
    "IncompleteConversionError",
    "check_complete",
    "processor_for_vocabulary",
    "save_model_directory",
    "save_original_conversion",
]
