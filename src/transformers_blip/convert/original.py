"""The original Salesforce BLIP checkpoints (the `.pth` files of github.com/salesforce/BLIP) <-> our heads.

    model, report = load_original_checkpoint("model_base_caption_capfilt_large.pth")
    model, report = load_original_checkpoint("model_base.pth", head="retrieval", image_size=384)
    save_original_checkpoint(model, "exported.pth")

An original checkpoint is `{"model": state_dict, ...}` in the names of `original_layout.py`. Loading infers the config
from the tensor shapes (unless one is given), builds the head, renames the tensors and accounts for every one of them
in a [`ConversionReport`]: loaded, resized (ViT position embeddings for another image size), dropped as expected
(momentum copies, queues, position ids, tensors tied to one already loaded, modules the head does not have), dropped
unexpectedly (unknown names, shapes that differ) and missing. The original loader drops shape-mismatched tensors
silently; here each drop is logged (expected ones at info level, the rest as warnings) and returned. The head's
tensors are copies of their own, never views of the checkpoint's or of each other. `task_head_from_pretraining`
(`convert.pretraining`) runs our pretraining models through the same engine, so every conversion reports alike.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from transformers.utils import logging

from ..configuration_blip import BlipConfig, BlipTextConfig, BlipVisionConfig
from ..modeling_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipModel,
    BlipPreTrainedModel,
)
from ..modeling_nlvr import NEW_IN_NLVR_HEAD, BlipForVisualReasoning, single_attention_name
from ..modeling_pretraining import BlipForPreTraining
from ..modeling_vision import interpolate_position_embedding, square_grid_side
from .original_layout import (
    DEFAULT_HEAD_OF_VARIANT,
    DEFAULTED,
    NOT_IN_FEATURE_EXTRACTOR,
    ORIGINAL_MODULES,
    detect_variant,
    to_original,
    to_ours,
    top_module,
    unused_tensor_reason,
)

logger = logging.get_logger(__name__)

# Our heads by the names `head=` accepts (their class names work too).
HEADS: dict[str, type[BlipPreTrainedModel]] = {
    "captioning": BlipForConditionalGeneration,
    "retrieval": BlipForImageTextRetrieval,
    "vqa": BlipForQuestionAnswering,
    "features": BlipModel,
    "pretraining": BlipForPreTraining,
    "nlvr": BlipForVisualReasoning,
}

# Why the NLVR2 head's merge layers and classifier get no value from a checkpoint of another variant.
NEW_IN_NLVR_HEAD_REASON = "new in the NLVR2 head: randomly initialised, as the original fine-tuning starts"

# The original text model's settings that shapes do not reveal (its `configs/med_config.json`, BERT-base).
ORIGINAL_TEXT_SETTINGS = dict(
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    label_smoothing=0.1,
)
ORIGINAL_VIT_LAYER_NORM_EPS = 1e-6
# Stochastic depth of the original ViTs by width: ViT-L always trains with 0.1 (`create_vit` in models/blip.py).
ORIGINAL_VIT_DROP_PATH = {1024: 0.1}
# Every released BLIP (ViT-B/16, ViT-L/16, BERT-base) has 64-wide attention heads.
ORIGINAL_HEAD_DIM = 64
# How every "cannot infer" error ends.
_GIVE_CONFIG = "give the config explicitly (config=, or --config on the command line)"


@dataclass
class ConversionReport:
    """What `load_original_checkpoint` did with every tensor. Checkpoint keys are in the original's names, model keys
    in ours; every dict maps a key to the reason or the change."""

    variant: str
    head: str
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    dropped_expected: dict[str, str] = field(default_factory=dict)
    dropped_unexpected: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    defaulted: dict[str, str] = field(default_factory=dict)

    @property
    def is_complete(self) -> bool:
        """Every tensor of the model came from the checkpoint (or a documented default) and nothing unknown was
        dropped."""
        return not self.dropped_unexpected and not self.missing

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.variant} checkpoint -> {self.head}: {len(self.loaded)} tensors loaded, {len(self.resized)} "
            f"resized, {len(self.dropped_expected)} dropped as expected, {len(self.dropped_unexpected)} dropped "
            f"unexpectedly, {len(self.missing)} missing, {len(self.defaulted)} defaulted"
        ]
        lines += [f"  resized {key}: {old} -> {new}" for key, (old, new) in self.resized.items()]
        lines += [f"  dropped as expected: {group}" for group in _grouped(self.dropped_expected)]
        lines += [f"  DROPPED {key}: {why}" for key, why in self.dropped_unexpected.items()]
        lines += [f"  MISSING {key}: initialised randomly" for key in self.missing]
        lines += [f"  defaulted {key}: {why}" for key, why in self.defaulted.items()]
        return "\n".join(lines)


def _grouped(reasons: Mapping[str, str]) -> list[str]:
    """One line per module and kind of reason (the text before its first ": "), so that 300 momentum tensors take
    one line, not 300."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key, reason in reasons.items():
        groups[(top_module(key), reason.split(": ", 1)[0])].append(key)
    lines = []
    for (module, kind), keys in groups.items():
        single = len(keys) == 1
        lines.append(f"{keys[0]}: {reasons[keys[0]]}" if single else f"{module}.* ({len(keys)} tensors): {kind}")
    return lines


# ---- Reading and inspecting a checkpoint ---------------------------------------------------------------------------


def _load_file(path: str | os.PathLike) -> object:
    """`torch.load` of a `.pth` file with tensors only; a file it cannot read is a `ValueError` naming the file."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty: not a checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds Python objects besides tensors, which weights_only loading refuses. If you trust "
            "the file, load it yourself (torch.load(path, weights_only=False)) and pass checkpoint['model']."
        ) from error
    except (RuntimeError, EOFError, KeyError, OSError) as error:  # what torch.load raises on cut or foreign bytes
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {error}") from error


def read_original_state_dict(checkpoint: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of an original checkpoint: a `.pth` path, the loaded `{"model": ...}` dict or the state dict.

    Anything else (a file that is not a checkpoint, a list, a bare tensor, names without tensors) is a `ValueError`
    that names the file."""
    source = os.fspath(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint"
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _load_file(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"{source} holds a {type(checkpoint).__name__}, not a state dict: an original BLIP checkpoint is "
            "{'model': {name: tensor}} or {name: tensor}"
        )
    if isinstance(checkpoint.get("model"), Mapping):
        checkpoint = checkpoint["model"]
    not_tensors = [str(key) for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: not a state dict, these entries are not tensors: {', '.join(not_tensors[:10])}")
    if not checkpoint:
        raise ValueError(f"{source} holds no tensors")
    return dict(checkpoint)


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity (a diverged or damaged checkpoint)."""
    return [
        key
        for key, tensor in state_dict.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    bad = non_finite_tensors(state_dict)
    if bad:
        raise ValueError(f"{len(bad)} tensors of the checkpoint hold NaN or Inf values: {', '.join(bad)}")


def _shape(shapes: Mapping[str, Sequence[int]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"cannot infer the config: the checkpoint has no `{key}`; {_GIVE_CONFIG}")
    return tuple(shapes[key])


def _count_numbered(shapes: Mapping[str, Sequence[int]], prefix: str) -> int:
    """How many numbered children (`prefix.0.`, `prefix.1.`, ...) the checkpoint has: a depth."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    numbers = {int(match.group(1)) for key in shapes if (match := pattern.match(key))}
    if not numbers:
        raise ValueError(f"cannot infer the config: the checkpoint has no `{prefix}.<n>.*` tensors; {_GIVE_CONFIG}")
    return max(numbers) + 1


def _head_count(width: int, heads: int | None, argument: str) -> int:
    """The attention heads of a model `width` wide: `heads` when given (the `argument` that gives them), else one per
    64 channels, as in every released BLIP."""
    how_to_give = f"pass the head count ({argument}=, or --{argument} on the command line) or {_GIVE_CONFIG}"
    if heads is None:
        if width % ORIGINAL_HEAD_DIM:
            raise ValueError(
                f"cannot infer {argument}: the width {width} is not a multiple of {ORIGINAL_HEAD_DIM}, the head size "
                f"of every released BLIP; {how_to_give}"
            )
        return width // ORIGINAL_HEAD_DIM
    if heads <= 0 or width % heads:
        raise ValueError(f"{argument}={heads} does not divide the width {width} into equal heads; {how_to_give}")
    return heads


def _is_square_grid(num_patches: int) -> bool:
    try:
        square_grid_side(num_patches)
    except ValueError:
        return False
    return True


def _infer_vision_config(
    shapes: Mapping[str, Sequence[int]], image_size: int | None, num_attention_heads: int | None
) -> BlipVisionConfig:
    width = _shape(shapes, "visual_encoder.cls_token")[-1]
    patch_size = _shape(shapes, "visual_encoder.patch_embed.proj.weight")[-1]
    try:
        grid_side = square_grid_side(_shape(shapes, "visual_encoder.pos_embed")[1] - 1)
    except ValueError as error:
        raise ValueError(
            f"cannot infer the image size from visual_encoder.pos_embed: {error}; {_GIVE_CONFIG}"
        ) from error
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=_shape(shapes, "visual_encoder.blocks.0.mlp.fc1.weight")[0],
        num_hidden_layers=_count_numbered(shapes, "visual_encoder.blocks"),
        num_attention_heads=_head_count(width, num_attention_heads, "vision_num_attention_heads"),
        image_size=image_size or grid_side * patch_size,
        patch_size=patch_size,
        layer_norm_eps=ORIGINAL_VIT_LAYER_NORM_EPS,
        drop_path_rate=ORIGINAL_VIT_DROP_PATH.get(width, 0.0),
    )


def _infer_text_config(shapes: Mapping[str, Sequence[int]], num_attention_heads: int | None) -> BlipTextConfig:
    # Captioning checkpoints have only the decoder; the others have the encoder (same shapes where both exist).
    prefix = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in shapes else "text_decoder.bert."
    vocab_size, width = _shape(shapes, prefix + "embeddings.word_embeddings.weight")
    return BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=_shape(shapes, prefix + "encoder.layer.0.intermediate.dense.weight")[0],
        num_hidden_layers=_count_numbered(shapes, prefix + "encoder.layer"),
        num_attention_heads=_head_count(width, num_attention_heads, "text_num_attention_heads"),
        max_position_embeddings=_shape(shapes, prefix + "embeddings.position_embeddings.weight")[0],
        **ORIGINAL_TEXT_SETTINGS,
    )


def infer_config(
    shapes: Mapping[str, Sequence[int]],
    image_size: int | None = None,
    text_num_attention_heads: int | None = None,
    vision_num_attention_heads: int | None = None,
) -> BlipConfig:
    """The config of an original checkpoint from its tensor shapes (original names).

    Widths, depths, vocabulary, position counts and the image size come from the shapes; attention heads from the
    width (64 per head, as in every released BLIP) unless `text_num_attention_heads` / `vision_num_attention_heads`
    give them; the rest are the original's settings: LayerNorm eps 1e-6 in the ViT (stochastic depth 0.1 for ViT-L),
    BERT-base's eps and dropouts and label smoothing 0.1 in the text model. `image_size` asks for another input size
    than the checkpoint's (its position embeddings are then resized).
    """
    kwargs = {}
    if "vision_proj.weight" in shapes:
        kwargs["embed_dim"] = _shape(shapes, "vision_proj.weight")[0]
    if "image_queue" in shapes:
        kwargs["queue_size"] = _shape(shapes, "image_queue")[1]
    merged_layers = [
        int(match.group(1))
        for key in shapes
        if (match := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.crossattention\.output\.merge_layer\.", key))
    ]
    if merged_layers:  # an NLVR2 checkpoint: its first layer that concatenates the two images' attention outputs
        kwargs["nlvr_merge_from_layer"] = min(merged_layers)
    return BlipConfig(
        text_config=_infer_text_config(shapes, text_num_attention_heads),
        vision_config=_infer_vision_config(shapes, image_size, vision_num_attention_heads),
        **kwargs,
    )


def resolve_head(head: str | type[BlipPreTrainedModel], variant: str) -> type[BlipPreTrainedModel]:
    """The head class for `head` (a name of `HEADS`, a class name, a class or "auto") and a checkpoint variant."""
    if isinstance(head, type):
        return head
    if head == "auto":
        if variant not in DEFAULT_HEAD_OF_VARIANT:
            raise ValueError(
                f"a {variant} checkpoint initialises every head: choose one with head= ({', '.join(HEADS)})"
            )
        head = DEFAULT_HEAD_OF_VARIANT[variant]
    by_class_name = {head_class.__name__: head_class for head_class in HEADS.values()}
    if head in HEADS:
        return HEADS[head]
    if head in by_class_name:
        return by_class_name[head]
    raise ValueError(f"unknown head {head!r}: use one of {', '.join(HEADS)}, a class name, a class or 'auto'")


# ---- The plan: what happens to each tensor -------------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """Where each tensor of the model comes from, decided from names and shapes alone (so it also runs on a model
    built on the meta device), with the report it produces."""

    report: ConversionReport
    sources: dict[str, str] = field(default_factory=dict)  # our key -> original key
    tied_duplicates: dict[str, str] = field(default_factory=dict)  # original key -> our tied key it would fill


def _is_vit_position_embedding(our_key: str) -> bool:
    return our_key.startswith("vision_model") and our_key.endswith(".embeddings.position_embedding")


def _resizable(old_shape: tuple[int, ...], new_shape: tuple[int, ...]) -> bool:
    """Both are `(1, 1 + side * side, D)` position embeddings of the same width."""
    return (
        len(old_shape) == len(new_shape) == 3
        and old_shape[0] == new_shape[0] == 1
        and old_shape[2] == new_shape[2]
        and _is_square_grid(old_shape[1] - 1)
        and _is_square_grid(new_shape[1] - 1)
    )


def _tied_root(our_key: str, tied: Mapping[str, str]) -> str:
    """The tensor a tied key ultimately shares; ties chain (LM head -> decoder embeddings -> encoder embeddings)."""
    while our_key in tied:
        our_key = tied[our_key]
    return our_key


def _why_not_in_head(original_key: str, our_key: str, head_modules: set[str], head: str) -> tuple[bool, str]:
    """(expected?, reason) for a checkpoint tensor the head has no tensor for."""
    module = top_module(original_key)
    if module in ORIGINAL_MODULES and top_module(our_key) not in head_modules:
        return True, f"{ORIGINAL_MODULES[module]}, which {head} does not have"
    reason = unused_tensor_reason(original_key)
    if reason is not None:
        return True, reason
    return False, f"unknown name: {head} has no tensor {our_key}"


def plan_conversion(
    original_shapes: Mapping[str, Sequence[int]], model: BlipPreTrainedModel, variant: str = "unknown"
) -> ConversionPlan:
    """Decides, for each tensor of an original checkpoint (`{original key: shape}`), whether `model` takes it."""
    head = type(model).__name__
    model_shapes = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    head_modules = {top_module(key) for key in model_shapes}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    plan = ConversionPlan(report=ConversionReport(variant=variant, head=head))
    report = plan.report

    # NLVR2 from a checkpoint with one cross-attention per layer: each of its tensors fills two of ours.
    copies = defaultdict(list)
    for our_key in model_shapes:
        if single_attention_name(our_key) != our_key:
            copies[single_attention_name(our_key)].append(our_key)
    for original_key, shape in original_shapes.items():
        our_key = to_ours(original_key)
        for target in [our_key] if our_key in model_shapes else copies.get(our_key, [our_key]):
            _plan_tensor(plan, original_key, tuple(shape), target, model_shapes, head_modules, tied)

    for our_key in model_shapes:
        if our_key in plan.sources or our_key in tied:
            continue  # a tied tensor is filled, or missing, with the one it is tied to
        reason = _default_reason(our_key, variant)
        if reason is not None:
            report.defaulted[our_key] = reason
        else:
            report.missing.append(our_key)
    return plan


def _default_reason(our_key: str, variant: str) -> str | None:
    """Where a tensor that a checkpoint of `variant` does not store gets its value, or None when it should have."""
    if our_key in DEFAULTED:
        return DEFAULTED[our_key]
    if variant != "nlvr" and NEW_IN_NLVR_HEAD.search(our_key):
        return NEW_IN_NLVR_HEAD_REASON
    if variant == "features":
        return NOT_IN_FEATURE_EXTRACTOR.get(top_module(our_key))
    return None


def _plan_tensor(
    plan: ConversionPlan,
    original_key: str,
    shape: tuple[int, ...],
    our_key: str,
    model_shapes: Mapping[str, tuple[int, ...]],
    head_modules: set[str],
    tied: Mapping[str, str],
) -> None:
    """Decides what happens to one original tensor bound for `our_key`, and records it in the plan and report."""
    report, head = plan.report, plan.report.head
    if our_key not in model_shapes:
        expected, reason = _why_not_in_head(original_key, our_key, head_modules, head)
        (report.dropped_expected if expected else report.dropped_unexpected)[original_key] = reason
        return
    model_shape = model_shapes[our_key]
    if shape != model_shape:
        if not (_is_vit_position_embedding(our_key) and _resizable(shape, model_shape)):
            report.dropped_unexpected[original_key] = f"shape {shape} in the checkpoint, {model_shape} in {head}"
            return
        report.resized[our_key] = (shape, model_shape)
    if our_key in tied:
        # The model shares this tensor with another it loads: storing it twice would only risk disagreement.
        plan.tied_duplicates[original_key] = our_key
        source = to_original(_tied_root(our_key, tied))
        report.dropped_expected[original_key] = f"tied duplicate: the same tensor as {source}"
        return
    plan.sources[our_key] = original_key
    report.loaded.append(our_key)


# ---- Loading -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def planned_state_dict(state_dict: Mapping[str, torch.Tensor], plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """The planned tensors under our names, each in storage of its own. One original tensor may fill several of ours
    (the NLVR2 head's two attentions, VQA's question encoder and answer decoder from a pretraining checkpoint whose
    decoder shares the encoder's tensors): shared storage would make `save_pretrained` refuse them and tie them in
    fine-tuning. Copies also keep the model apart from a state dict the caller still holds."""
    converted = {}
    for our_key, original_key in plan.sources.items():
        tensor = state_dict[original_key]
        if our_key in plan.report.resized:
            grid_side = square_grid_side(plan.report.resized[our_key][1][1] - 1)
            tensor = interpolate_position_embedding(tensor, grid_side, grid_side)
        converted[our_key] = tensor.detach().clone()
    return converted


def check_tied_duplicates(state_dict: Mapping[str, torch.Tensor], plan: ConversionPlan, tied: Mapping[str, str]):
    """A tied duplicate is only dropped quietly when it holds the very values of the tensor it is tied to."""
    report = plan.report
    for original_key, our_key in plan.tied_duplicates.items():
        source_key = plan.sources.get(_tied_root(our_key, tied))
        if source_key is None or torch.equal(state_dict[original_key], state_dict[source_key]):
            continue
        del report.dropped_expected[original_key]
        report.dropped_unexpected[original_key] = (
            f"differs from {source_key}, with which {report.head} ties it; the values of {source_key} are used"
        )


def log_report(report: ConversionReport) -> None:
    """Expected drops at info level, anything that loses or lacks weights as a warning listing every key."""
    for group in _grouped(report.dropped_expected):
        logger.info(f"{report.head}: dropped as expected {group}")
    for key, (old, new) in report.resized.items():
        logger.info(f"{report.head}: resized {key} from {old} to {new} (bicubic on the patch grid)")
    for key, why in report.defaulted.items():
        logger.info(f"{report.head}: {key} {why}")
    if report.dropped_unexpected:
        listing = "\n".join(f"  {key}: {why}" for key, why in report.dropped_unexpected.items())
        logger.warning(f"{report.head}: {len(report.dropped_unexpected)} checkpoint tensors NOT loaded:\n{listing}")
    if report.missing:
        listing = "\n".join(f"  {key}" for key in report.missing)
        logger.warning(
            f"{report.head}: {len(report.missing)} tensors not in the checkpoint, initialised randomly:\n{listing}"
        )


def _config_for(
    shapes: Mapping[str, Sequence[int]],
    config: BlipConfig | None,
    image_size: int | None,
    text_num_attention_heads: int | None,
    vision_num_attention_heads: int | None,
) -> BlipConfig:
    if config is None:
        return infer_config(shapes, image_size, text_num_attention_heads, vision_num_attention_heads)
    if image_size is not None and image_size != config.vision_config.image_size:
        config = copy.deepcopy(config)
        config.vision_config.image_size = image_size
    return config


def load_original_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    head: str | type[BlipPreTrainedModel] = "auto",
    image_size: int | None = None,
    config: BlipConfig | None = None,
    text_num_attention_heads: int | None = None,
    vision_num_attention_heads: int | None = None,
) -> tuple[BlipPreTrainedModel, ConversionReport]:
    r"""
    Loads an original Salesforce BLIP checkpoint into one of our heads, reporting what happened to every tensor.

    Args:
        checkpoint: a `.pth` path (read with `weights_only=True`), the loaded `{"model": ...}` dict or its state dict.
        head: `"auto"` (captioning, ITM/retrieval, VQA and NLVR2 checkpoints load into their own head), one of
            `HEADS` (`"captioning"`, `"retrieval"`, `"vqa"`, `"nlvr"`, `"features"`, `"pretraining"`: a pretraining
            checkpoint serves them all, so it needs one), a head class or its name.
        image_size: input size of the model; the ViT position embeddings are resized bicubically when it differs
            from the checkpoint's, as the original fine-tuning does (224 -> 384 -> 480).
        config: the model's config; by default inferred from the tensor shapes (`infer_config`).
        text_num_attention_heads, vision_num_attention_heads: the head counts, when the config is inferred and a
            model's heads are not 64 wide (every released BLIP's are).

    Returns:
        `(model, report)`: the head in eval mode (its tensors its own, not the checkpoint's) and a
        [`ConversionReport`].

    Raises:
        ValueError: the checkpoint cannot be read, is of no known kind, holds NaN or Inf, or its config cannot be
            inferred.
    """
    state_dict = read_original_state_dict(checkpoint)
    _check_finite(state_dict)
    variant = detect_variant(state_dict)
    head_class = resolve_head(head, variant)
    shapes = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}
    config = _config_for(shapes, config, image_size, text_num_attention_heads, vision_num_attention_heads)

    with torch.device("meta"):
        skeleton = head_class(config)
    plan = plan_conversion(shapes, skeleton, variant)
    check_tied_duplicates(state_dict, plan, skeleton.all_tied_weights_keys)
    with without_transformers_load_report():
        model = head_class.from_pretrained(None, config=config, state_dict=planned_state_dict(state_dict, plan))
    log_report(plan.report)
    return model.eval(), plan.report


@contextlib.contextmanager
def without_transformers_load_report() -> Iterator[None]:
    """Silences transformers' load report (its warnings) inside the block; errors still show.

    transformers' own load report would list the tensors the plan already accounts for (defaults, new NLVR2
    modules) as missing; `log_report` says what happened to each one instead. A filter, not a level: transformers
    reads the level of this logger to decide on other checks."""
    loading_logger = logging.get_logger("transformers.modeling_utils")

    def errors_only(record) -> bool:
        return record.levelno >= logging.ERROR

    loading_logger.addFilter(errors_only)
    try:
        yield
    finally:
        loading_logger.removeFilter(errors_only)


# ---- Exporting -----------------------------------------------------------------------------------------------------


def original_state_dict(model: BlipPreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's tensors in the original names, plus the `position_ids` buffers of the original's BERT embeddings.
    Tied tensors appear under every name that uses them, as in the original's files."""
    state_dict = {to_original(key): tensor.detach().cpu() for key, tensor in model.state_dict().items()}
    for key, table in list(state_dict.items()):
        if key.endswith("embeddings.position_embeddings.weight"):
            prefix = key.removesuffix("position_embeddings.weight")
            state_dict[prefix + "position_ids"] = torch.arange(table.shape[0]).unsqueeze(0)  # (1, max_positions)
    return state_dict


def save_original_checkpoint(model: BlipPreTrainedModel, path: str | os.PathLike) -> None:
    """Writes `{"model": state_dict}` in the original layout, which the original code's `load_checkpoint` reads."""
    torch.save({"model": original_state_dict(model)}, path)


__all__ = [
    "HEADS",
    "ConversionPlan",
    "ConversionReport",
    "infer_config",
    "load_original_checkpoint",
    "log_report",
    "original_state_dict",
    "plan_conversion",
    "non_finite_tensors",
    "read_original_state_dict",
    "resolve_head",
    "save_original_checkpoint",
    "without_transformers_load_report",
]
