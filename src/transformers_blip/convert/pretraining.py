"""From a pretraining model to the task heads, as the original fine-tuning scripts start.

A [`BlipForPreTraining`] checkpoint stores each shared tensor of the encoder and the decoder once (under
`text_encoder.`), so the task heads cannot read it with `from_pretrained` alone. `task_head_from_pretraining` writes
the pretraining model out in the original layout, where every shared tensor appears under each name that uses it, and
loads that with the engine of original checkpoints (`convert.original`): the head gets what the original
fine-tuning takes from a pretraining `.pth`, and the same [`ConversionReport`] accounts for every tensor.

- captioning ([`BlipForConditionalGeneration`]): the ViT and the pretraining decoder (its self-attention, the shared
  embeddings, cross-attention and feed-forward, its LM head);
- retrieval ([`BlipForImageTextRetrieval`]) and features ([`BlipModel`]): the ViT, the text encoder, both
  projections, the temperature (and for retrieval the ITM head);
- VQA ([`BlipForQuestionAnswering`]): the ViT, the text encoder as the question encoder, and the pretraining decoder
  as the answer decoder, as the original `blip_vqa` loads it;
- NLVR2 ([`BlipForVisualReasoning`]): the ViT and the text encoder, whose cross-attention initialises both of each
  layer's image attentions (`self0`, `self1`) and their projections (`dense0`, `dense1`), as the original
  `blip_nlvr` loads it. The merge layers and the classifier are new (reported as defaulted).

Every tensor of the head is a copy of its own: the answer decoder does not share storage with the question encoder,
nor `self0` with `self1`, nor the head with the pretraining model, so the head saves and fine-tunes each one apart.
What a head has no place for (momentum encoders, queues, modules of other heads) is dropped as expected; anything
else (a missing tensor, a shape that differs) is reported and logged as a warning. ViT position embeddings are
resized bicubically when the head's image size differs (224 -> 384).
"""

from __future__ import annotations

import os
import warnings

from ..configuration_blip import BlipConfig
from ..modeling_blip import BlipPreTrainedModel
from ..modeling_pretraining import BlipForPreTraining
from .original import ConversionReport, load_original_checkpoint, original_state_dict


def task_head_from_pretraining(
    model_class: type[BlipPreTrainedModel],
    pretraining: BlipForPreTraining | str | os.PathLike,
    config: BlipConfig | None = None,
    output_report: bool = False,
    output_loading_info: bool = False,
) -> BlipPreTrainedModel | tuple[BlipPreTrainedModel, ConversionReport | dict]:
    r"""
    Builds a task head initialised from a pretraining model.

    Args:
        model_class: the head, e.g. [`BlipForConditionalGeneration`], [`BlipForImageTextRetrieval`],
            [`BlipForQuestionAnswering`], [`BlipForVisualReasoning`] or [`BlipModel`].
        pretraining: a [`BlipForPreTraining`] or the directory it was saved to (a Trainer checkpoint too).
        config: the head's config, e.g. with a larger `vision_config.image_size`; defaults to the pretraining one.
        output_report: also return the [`ConversionReport`] (checkpoint keys in the original names, as for original
            checkpoints).
        output_loading_info: deprecated, for one more release: also return the report as the earlier dict of
            `missing_keys`, `unexpected_keys` and `mismatched_keys`.

    Returns:
        The head in eval mode (and the report).
    """
    if not isinstance(pretraining, BlipForPreTraining):
        pretraining = BlipForPreTraining.from_pretrained(pretraining)
    config = config if config is not None else BlipConfig.from_dict(pretraining.config.to_dict())
    model, report = load_original_checkpoint(original_state_dict(pretraining), head=model_class, config=config)
    if output_loading_info:
        warnings.warn("output_loading_info is deprecated: pass output_report=True", FutureWarning, stacklevel=2)
        return model, _as_loading_info(report)
    return (model, report) if output_report else model


def _as_loading_info(report: ConversionReport) -> dict[str, list[str]]:
    """The report in the earlier format of `output_loading_info`."""
    mismatched = [f"{key}: {why}" for key, why in report.dropped_unexpected.items() if why.startswith("shape")]
    unexpected = [key for key, why in report.dropped_unexpected.items() if not why.startswith("shape")]
    return {"missing_keys": list(report.missing), "unexpected_keys": unexpected, "mismatched_keys": mismatched}


__all__ = ["task_head_from_pretraining"]
