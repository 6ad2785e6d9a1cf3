"""From a pretraining checkpoint to the task heads, as the original fine-tuning scripts start.

A [`BlipForPreTraining`] checkpoint stores each shared tensor of the encoder and the decoder once (under
`text_encoder.`), so the task heads cannot read it with `from_pretrained` alone. `task_head_from_pretraining` builds
the head and fills it from the pretraining model's full state dict, where every shared tensor appears under both
names:

- captioning ([`BlipForConditionalGeneration`]): the ViT and the pretraining decoder (its self-attention, the shared
  embeddings, cross-attention and feed-forward, its LM head);
- retrieval ([`BlipForImageTextRetrieval`]): the ViT, the text encoder, both projections, the ITM head and the
  temperature;
- VQA ([`BlipForQuestionAnswering`]): the ViT, the text encoder as the question encoder, and the pretraining decoder
  as the answer decoder (an independent copy from then on), as the original `blip_vqa` loads it;
- NLVR2 ([`BlipForVisualReasoning`]): the ViT and the text encoder, whose cross-attention initialises both of each
  layer's image attentions (`self0`, `self1`) and their projections (`dense0`, `dense1`), as the original
  `blip_nlvr` loads it. The merge layers and the classifier are new (randomly initialised, not warned about).

What a head has no place for (momentum encoders, queues, modules of other heads) is dropped silently, because it is
expected; anything else that does not fit (an unknown key, a missing one, a shape that differs) is named in a
warning. ViT position embeddings are resized bicubically when the head's image size differs (224 -> 384).
"""

from __future__ import annotations

import os

import torch
from transformers.utils import logging

from ..configuration_blip import BlipConfig
from ..modeling_blip import BlipPreTrainedModel
from ..modeling_nlvr import NEW_IN_NLVR_HEAD, single_attention_name
from ..modeling_pretraining import BlipForPreTraining

logger = logging.get_logger(__name__)

_POSITION_EMBEDDING = "vision_model.embeddings.position_embedding"
# State of the pretraining model that no task head keeps.
_PRETRAINING_ONLY = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def _is_pretraining_only(key: str) -> bool:
    module_name = key.split(".", 1)[0]
    return key in _PRETRAINING_ONLY or module_name.endswith("_m")


def _resized_position_embedding(pretraining: BlipForPreTraining, target_shape: torch.Size) -> torch.Tensor:
    """The pretraining ViT's position embeddings laid out for the head's (square) patch grid."""
    grid_side = int((target_shape[1] - 1) ** 0.5)
    with torch.no_grad():
        return pretraining.vision_model.embeddings.position_embedding_for(grid_side, grid_side).detach().clone()


def task_head_from_pretraining(
    model_class: type[BlipPreTrainedModel],
    pretraining: BlipForPreTraining | str | os.PathLike,
    config: BlipConfig | None = None,
    output_loading_info: bool = False,
) -> BlipPreTrainedModel | tuple[BlipPreTrainedModel, dict[str, list[str]]]:
    r"""
    Builds a task head initialised from a pretraining model.

    Args:
        model_class: the head, e.g. [`BlipForConditionalGeneration`], [`BlipForImageTextRetrieval`],
            [`BlipForQuestionAnswering`] or [`BlipForVisualReasoning`].
        pretraining: a [`BlipForPreTraining`] or the directory it was saved to (a Trainer checkpoint too).
        config: the head's config, e.g. with a larger `vision_config.image_size`; defaults to the pretraining one.
        output_loading_info: also return `{"missing_keys", "unexpected_keys", "mismatched_keys"}`, the problems
            that were warned about, and `"new_keys"`, the head's own modules that pretraining has no weights for.

    Returns:
        The head in eval mode (and the loading info).
    """
    if not isinstance(pretraining, BlipForPreTraining):
        pretraining = BlipForPreTraining.from_pretrained(pretraining)
    config = config if config is not None else BlipConfig.from_dict(pretraining.config.to_dict())
    model = model_class(config)

    source = pretraining.state_dict()  # shared tensors appear under every name that uses them
    target = model.state_dict()
    head_modules = {name for name, _ in model.named_children()} | {
        name for name, _ in model.named_parameters(recurse=False)
    }
    state_dict, mismatched, used = {}, [], set()
    for key, tensor in target.items():
        source_key = single_attention_name(key)
        if source_key not in source:
            continue
        used.add(source_key)
        value = source[source_key]
        if value.shape != tensor.shape and key == _POSITION_EMBEDDING:
            value = _resized_position_embedding(pretraining, tensor.shape)
        if value.shape != tensor.shape:
            mismatched.append(f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(tensor.shape)} in the model")
            continue
        state_dict[key] = value
    absent = [key for key in target if single_attention_name(key) not in source]
    new = sorted(key for key in absent if NEW_IN_NLVR_HEAD.search(key))  # the head's own modules: expected
    missing = sorted(key for key in absent if not NEW_IN_NLVR_HEAD.search(key))
    unexpected = sorted(
        key
        for key in source
        if key not in used and not _is_pretraining_only(key) and key.split(".", 1)[0] in head_modules
    )
    model.load_state_dict(state_dict, strict=False)
    model.tie_weights()

    head = model_class.__name__
    if new:
        logger.info(f"{head} from pretraining: {len(new)} weights of its own are newly initialised: {new}")
    for problem, keys in (("missing from", missing), ("unexpected in", unexpected), ("not loaded from", mismatched)):
        if keys:
            logger.warning(f"{head} from pretraining: {len(keys)} weights {problem} the checkpoint: {keys}")
    model.eval()
    if output_loading_info:
        return model, {
            "missing_keys": missing,
            "unexpected_keys": unexpected,
            "mismatched_keys": mismatched,
            "new_keys": new,
        }
    return model


__all__ = ["task_head_from_pretraining"]
