"""Names of the original Salesforce BLIP checkpoints (github.com/salesforce/BLIP `.pth` files) and ours, as data.

The original models name the ViT as timm does (`visual_encoder.blocks.3.attn.qkv.weight`); ours follow transformers'
BLIP (`vision_model.encoder.layers.3.self_attn.qkv.weight`). The text side, the projections, the ITM head and the
temperature keep the original names, so only the ViT needs rules. Everything a reader needs to know about the two
layouts is in the tables below; the functions only apply them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..modeling_pretraining import MOMENTUM_PAIRS, QUEUE_BUFFERS, momentum_name

# Top-level ViT modules: original -> ours, and their momentum copies of the pretraining and retrieval models.
VISION_MODULE_RENAMES = (
    ("visual_encoder", "vision_model"),
    (momentum_name("visual_encoder"), momentum_name("vision_model")),
)
# Tensors the original models name otherwise than the others do: original -> ours. The retrieval model calls the
# queue pointer `ptr_queue`; pretraining (and we) `queue_ptr`. Exports use our name, which the original reads too.
ORIGINAL_ALIASES = {"ptr_queue": "queue_ptr"}
_MODULE_TO_OURS = dict(VISION_MODULE_RENAMES)
_MODULE_TO_ORIGINAL = {ours: original for original, ours in VISION_MODULE_RENAMES}

# Inside a ViT: (original, ours). `{n}` is a block number. A rule ending in "." renames a module (its tensors follow
# it); any other rule renames one tensor.
VIT_RENAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.", "embeddings.patch_embedding."),
    ("blocks.{n}.norm1.", "encoder.layers.{n}.layer_norm1."),
    ("blocks.{n}.attn.qkv.", "encoder.layers.{n}.self_attn.qkv."),
    ("blocks.{n}.attn.proj.", "encoder.layers.{n}.self_attn.projection."),
    ("blocks.{n}.norm2.", "encoder.layers.{n}.layer_norm2."),
    ("blocks.{n}.mlp.", "encoder.layers.{n}.mlp."),
    ("norm.", "post_layernorm."),
)

# What each top-level module of an original checkpoint is: the reason given when a head has no place for it.
ORIGINAL_MODULES = {
    "visual_encoder": "the ViT",
    "text_encoder": "the text encoder (ITC and ITM)",
    "text_decoder": "the image-grounded decoder (captioning LM)",
    "vision_proj": "the ITC image projection",
    "text_proj": "the ITC text projection",
    "itm_head": "the ITM classifier",
    "cls_head": "the NLVR2 classifier",
    "temp": "the ITC temperature",
}
ORIGINAL_MODULES |= {
    momentum_name(_MODULE_TO_ORIGINAL.get(online, online)): "a momentum copy, used only to train ITC"
    for online, _ in MOMENTUM_PAIRS
}
ORIGINAL_MODULES |= QUEUE_BUFFERS
ORIGINAL_MODULES |= {alias: QUEUE_BUFFERS[ours] for alias, ours in ORIGINAL_ALIASES.items()}

# Original tensors inside modules our heads do have, where ours have no place for them by design:
# (pattern on the original name, why).
UNUSED_TENSORS = (
    (r"(^|\.)embeddings\.position_ids$", "BERT's position-id buffer: our text model numbers positions on the fly"),
    (
        rf"^{momentum_name('text_encoder')}\.encoder\.layer\.\d+\.crossattention\.",
        "the momentum text encoder only encodes text, so its cross-attention is never used",
    ),
)

# Tensors of ours that some original variants never stored, and the value they start from instead.
DEFAULTED = {
    "temp": "not stored by this variant (the original ITM model has no temperature): config.itc_temperature",
    "idx_queue": "not stored by this variant (pretraining keeps no image ids): filled with the no-id marker",
}

# Modules of our feature model that the original feature extractor (`BLIP_Base`: the ViT and the text encoder) does
# not have, and where their values come from when a `features` checkpoint lacks them.
NOT_IN_FEATURE_EXTRACTOR = {
    "vision_proj": "not in a feature-extractor checkpoint: randomly initialised (ITC features need training)",
    "text_proj": "not in a feature-extractor checkpoint: randomly initialised (ITC features need training)",
    "temp": "not in a feature-extractor checkpoint: config.itc_temperature",
}

# Top-level modules that only NLVR2 checkpoints have (their classifier).
NLVR_MODULES = {"cls_head"}

# Which of our heads each variant loads into when the caller does not say. The pretraining checkpoints
# (`model_base.pth`, `model_large.pth`, `model_base_capfilt_large.pth`) serve every head, so the caller chooses.
DEFAULT_HEAD_OF_VARIANT = {
    "captioning": "captioning",
    "features": "features",
    "itm": "retrieval",
    "retrieval": "retrieval",
    "vqa": "vqa",
    "nlvr": "nlvr",
}


def _compile(template: str) -> re.Pattern:
    """A template such as `blocks.{n}.norm1.` as an anchored pattern; module templates match as prefixes."""
    pattern = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)")
    return re.compile("^" + pattern + ("" if template.endswith(".") else "$"))


def _rename_inside(name: str, rules: Iterable[tuple[re.Pattern, str]]) -> str:
    for pattern, replacement in rules:
        match = pattern.match(name)
        if match:
            return replacement.format(**match.groupdict()) + name[match.end() :]
    return name


_VIT_TO_OURS = [(_compile(original), ours) for original, ours in VIT_RENAMES]
_VIT_TO_ORIGINAL = [(_compile(ours), original) for original, ours in VIT_RENAMES]


def _rename(key: str, modules: dict[str, str], inner_rules: list[tuple[re.Pattern, str]]) -> str:
    module, _, inner = key.partition(".")
    if module not in modules:
        return key  # text modules, projections, heads, temperature and queues keep their names
    return f"{modules[module]}.{_rename_inside(inner, inner_rules)}"


def to_ours(original_key: str) -> str:
    """The name of an original checkpoint tensor in our layout (`visual_encoder.norm.weight` ->
    `vision_model.post_layernorm.weight`, `ptr_queue` -> `queue_ptr`)."""
    if original_key in ORIGINAL_ALIASES:
        return ORIGINAL_ALIASES[original_key]
    return _rename(original_key, _MODULE_TO_OURS, _VIT_TO_OURS)


def to_original(our_key: str) -> str:
    """The inverse of `to_ours`, aliases aside (they export under our name, `queue_ptr`)."""
    return _rename(our_key, _MODULE_TO_ORIGINAL, _VIT_TO_ORIGINAL)


def top_module(key: str) -> str:
    return key.split(".", 1)[0]


def unused_tensor_reason(original_key: str) -> str | None:
    """Why our modules have no place for this original tensor, or None when it is not one of `UNUSED_TENSORS`."""
    for pattern, reason in UNUSED_TENSORS:
        if re.search(pattern, original_key):
            return reason
    return None


def detect_variant(original_keys: Iterable[str]) -> str:
    """Which original model wrote a state dict: `pretraining`, `captioning`, `retrieval`, `itm`, `vqa`, `nlvr` or
    `features` (the feature extractor `BLIP_Base`: the ViT and the text encoder)."""
    modules = {top_module(key) for key in original_keys}
    if modules & NLVR_MODULES:
        return "nlvr"
    has_encoder, has_decoder = "text_encoder" in modules, "text_decoder" in modules
    if has_decoder and "itm_head" in modules:
        return "pretraining"
    if has_decoder and has_encoder:
        return "vqa"
    if has_decoder:
        return "captioning"
    if has_encoder and "itm_head" in modules:
        return "retrieval" if "image_queue" in modules else "itm"
    if has_encoder and "visual_encoder" in modules:
        return "features"
    raise ValueError(
        "not a BLIP checkpoint of a known kind: expected `visual_encoder.*` with `text_decoder.*` (captioning), "
        "`text_encoder.*` + `itm_head.*` (retrieval/ITM), both (VQA, pretraining) or `text_encoder.*` alone "
        f"(feature extractor); found modules {sorted(modules)}"
    )


__all__ = [
    "DEFAULTED",
    "DEFAULT_HEAD_OF_VARIANT",
    "NOT_IN_FEATURE_EXTRACTOR",
    "ORIGINAL_ALIASES",
    "ORIGINAL_MODULES",
    "VISION_MODULE_RENAMES",
    "UNUSED_TENSORS",
    "VIT_RENAMES",
    "detect_variant",
    "to_original",
    "to_ours",
    "top_module",
    "unused_tensor_reason",
]
