"""Starting BLIP from pretrained encoders, as the paper does: the ViT from ImageNet weights, the text side from BERT.

    model = BlipForPreTraining(config)
    report = load_pretrained_encoders(model, vision="facebook/deit-base-patch16-224", text="bert-base-uncased")

Vision sources: a hub id or a directory in transformers' `ViTModel` / `DeiTModel` layout (separate query, key and
value, fused here into the qkv projection), or timm's layout (`blocks.N.attn.qkv`, a `.safetensors`, `.pth` or
`.bin` file or a directory holding one), which is the layout the original BLIP loads DeiT in. DeiT's distillation
token and its position are dropped; classification heads are dropped; the position embeddings are resized to the
model's image size (bicubic on the patch grid).

Text sources: a hub id or a directory in `BertModel` / `BertForMaskedLM` layout. As the original pretraining starts:
the text encoder takes BERT's embeddings and layers; the image-grounded decoder, which shares everything but its
self-attention with the encoder, takes BERT's self-attention for its own and BERT's masked-LM head as its LM head;
the cross-attention layers are new. BERT's vocabulary lacks `[DEC]` and `[ENC]`: their two embedding rows (and LM
biases) keep the model's initialisation, reported as a resize. BERT's token-type embeddings and pooler have no
place in BLIP and are dropped.

Both go through the conversion engine of `convert.original` (BERT's names are the original BLIP's text names, and
timm's are its ViT names), so the report accounts for every tensor the same way: loaded, resized, dropped (with
why), and the model's tensors that no source holds, each with where its value comes from. The momentum copies of
the pretraining model start equal to the encoders they follow.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..modeling_blip import BlipPreTrainedModel
from .original import ConversionReport, check_tied_duplicates, log_report, plan_conversion, planned_state_dict
from .original import read_original_state_dict as read_pth_state_dict

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth")
_HUB_PATTERNS = ["*.safetensors", "*.bin", "*.pth", "*.json", "vocab.txt"]

# transformers' ViT/DeiT names (as saved on disk and on the hub) -> timm's, which are the original BLIP's.
_VIT_LAYER_RENAMES = (
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.output.dense.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
_VIT_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_CLASSIFIER = re.compile(r"^(classifier|cls_classifier|distillation_classifier|pooler|head|head_dist|fc_norm)\.")
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_NEW_IN_BLIP = (
    (re.compile(r"crossattention\."), "new: the cross-attention to the image, initialised as the original starts it"),
    (re.compile(r"^(vision_proj|text_proj)\."), "new: an ITC projection"),
    (re.compile(r"^itm_head\."), "new: the ITM classifier"),
    (re.compile(r"^temp$"), "new: config.itc_temperature"),
    (re.compile(r"_m\."), "new: a momentum copy, set equal to the online encoder it follows"),
    (re.compile(r"queue"), "new: ITC training state"),
)


class PretrainedSourceError(ValueError):
    """A vision or text source that cannot be read or is of no known layout; the message names it."""


def _local_files(source: str) -> Path:
    """A directory or file for `source`: itself when it exists here, else a download of the hub repo it names."""
    path = Path(source)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # network, authentication, not found: all mean "cannot read this source"
        message = f"{source}: neither a local path nor a hub repo that can be downloaded ({error})"
        raise PretrainedSourceError(message) from error


def read_weights(source: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, a model directory or a hub repo (safetensors preferred)."""
    path = _local_files(os.fspath(source))
    if path.is_dir():
        candidates = [path / name for name in WEIGHT_FILES if (path / name).exists()]
        candidates = candidates or sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth"))
        if not candidates:
            raise PretrainedSourceError(f"{source}: no weights file ({', '.join(WEIGHT_FILES)}) in this directory")
        path = candidates[0]
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own error types on a damaged header
            raise PretrainedSourceError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        return read_pth_state_dict(path)
    except ValueError as error:
        raise PretrainedSourceError(str(error)) from error


def _without_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The backbone's names without the wrapper's prefix (`vit.` in `ViTForImageClassification`); the wrapper's own
    tensors (its classifier) keep their names, to be dropped by name and reported."""
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in state_dict):
            return {key.removeprefix(prefix): value for key, value in state_dict.items()}
    return dict(state_dict)


def _fused_qkv(layer: Mapping[str, torch.Tensor], number: str, kind: str) -> torch.Tensor:
    parts = [layer[f"attention.attention.{name}.{kind}"] for name in ("query", "key", "value")]
    return torch.cat(parts, dim=0)  # (3D, D) or (3D,): q, k, v stacked as timm's qkv


def _timm_from_transformers_vit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    timm, layers = {}, {}
    for key, tensor in state_dict.items():
        match = _HF_LAYER.match(key)
        if match:
            layers.setdefault(match.group(1), {})[match.group(2)] = tensor
        else:
            timm[_VIT_RENAMES.get(key, key)] = tensor
    for number, layer in layers.items():
        for kind in ("weight", "bias"):
            timm[f"blocks.{number}.attn.qkv.{kind}"] = _fused_qkv(layer, number, kind)
        for name, tensor in layer.items():
            if name.startswith("attention.attention."):
                continue
            for old, new in _VIT_LAYER_RENAMES:
                if name.startswith(old):
                    timm[f"blocks.{number}.{new}{name.removeprefix(old)}"] = tensor
                    break
            else:
                timm[f"blocks.{number}.{name}"] = tensor
    if "embeddings.distillation_token" in timm:
        timm["dist_token"] = timm.pop("embeddings.distillation_token")
    return timm


def vision_state_dict(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict[str, str]]:
    """A ViT/DeiT state dict in any supported layout -> (original BLIP names under `visual_encoder.`, the tensors
    dropped with why)."""
    state_dict = _without_prefix(state_dict, ("vit.", "deit.", "model.", "module."))
    if any(_HF_LAYER.match(key) for key in state_dict):
        state_dict = _timm_from_transformers_vit(state_dict)
    elif not any(re.match(r"^blocks\.\d+\.attn\.qkv\.weight$", key) for key in state_dict):
        raise PretrainedSourceError(
            f"{source}: not a ViT in transformers' layout (encoder.layer.N.attention.attention.query) or timm's "
            "(blocks.N.attn.qkv)"
        )
    dropped = {}
    for key in [key for key in state_dict if _CLASSIFIER.match(key)]:
        state_dict.pop(key)
        dropped[f"{source}:{key}"] = "an ImageNet classification head or pooler: BLIP has none"
    if "dist_token" in state_dict:
        state_dict.pop("dist_token")
        dropped[f"{source}:dist_token"] = "DeiT's distillation token: BLIP's ViT has the class token only"
        # DeiT orders its positions [class, distillation, patches]: drop the distillation token's.
        position = state_dict["pos_embed"]
        state_dict["pos_embed"] = torch.cat([position[:, :1], position[:, 2:]], dim=1)
        dropped[f"{source}:pos_embed[1]"] = "the distillation token's position embedding"
    return {f"visual_encoder.{key}": value for key, value in state_dict.items()}, dropped


def text_state_dict(state_dict: Mapping[str, torch.Tensor], source: str) -> tuple[dict, dict[str, str]]:
    """A BERT state dict -> (the original BLIP's text encoder and decoder names, the tensors dropped with why)."""
    lm_head = {key.removeprefix("cls."): value for key, value in state_dict.items() if key.startswith("cls.")}
    bert = _without_prefix({k: v for k, v in state_dict.items() if not k.startswith("cls.")}, ("bert.",))
    if not any(key.startswith("encoder.layer.0.attention.self.query") for key in bert):
        raise PretrainedSourceError(f"{source}: not a BERT in BertModel / BertForMaskedLM layout")
    dropped = {}
    for key in [key for key in bert if key.startswith(("pooler.", "embeddings.token_type_embeddings"))]:
        bert.pop(key)
        dropped[f"{source}:{key}"] = "BERT's pooler and token types have no place in BLIP's text model"
    bert.pop("embeddings.position_ids", None)
    for key in [key for key in lm_head if key.startswith("seq_relationship")]:
        lm_head.pop(key)
        dropped[f"{source}:cls.{key}"] = "BERT's next-sentence head: BLIP has none"
    # Both BLIP towers start from BERT; the decoder's shared tensors are then found equal to the encoder's (ties),
    # its self-attention stays its own.
    original = {f"text_encoder.{key}": value for key, value in bert.items()}
    original |= {f"text_decoder.bert.{key}": value for key, value in bert.items()}
    original |= {f"text_decoder.cls.{key}": value for key, value in lm_head.items()}
    if "text_decoder.cls.predictions.decoder.bias" in original:
        # transformers saves the LM bias twice (decoder.bias is predictions.bias); the original stores one.
        original.pop("text_decoder.cls.predictions.decoder.bias")
    return original, dropped


def _grow_vocabulary(
    state_dict: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor], report_resized: dict
) -> None:
    """BERT's vocabulary rows into the model's larger vocabulary ([DEC] and [ENC] appended): the new rows keep the
    model's initialisation."""
    for key in list(state_dict):
        if not re.search(r"(word_embeddings\.weight|predictions\.bias)$", key):
            continue
        if key not in model_state:  # our text names are the original's
            continue
        source, target = state_dict[key], model_state[key]
        if source.shape[0] > target.shape[0]:
            raise PretrainedSourceError(
                f"{key}: the text source's vocabulary ({source.shape[0]}) is larger than the model's "
                f"({target.shape[0]}); build the model's config from the source's tokenizer"
            )
        if source.shape[0] < target.shape[0]:
            grown = target.detach().clone().to(source.dtype)
            grown[: source.shape[0]] = source
            state_dict[key] = grown
            report_resized[key] = (tuple(source.shape), tuple(target.shape))


def load_pretrained_encoders(
    model: BlipPreTrainedModel, vision: str | os.PathLike | None = None, text: str | os.PathLike | None = None
) -> ConversionReport:
    """Fills `model`'s ViT from `vision` and its text encoder (and decoder) from `text`, in place.

    Returns the report: `loaded`, `resized` (position embeddings, the grown vocabulary), `dropped_expected` (heads,
    DeiT's distillation token, BERT's pooler, the decoder's tensors that equal the encoder's they are tied to) and
    `dropped_unexpected` (anything of a source with no place in the model: nothing is loaded then), and `defaulted`:
    the model's tensors that no source holds, with where their values come from.
    """
    if vision is None and text is None:
        raise ValueError("give a vision source, a text source, or both")
    original, dropped, grown = {}, {}, {}
    if vision is not None:
        vision_part, vision_dropped = vision_state_dict(read_weights(vision), os.fspath(vision))
        original |= vision_part
        dropped |= vision_dropped
    if text is not None:
        text_part, text_dropped = text_state_dict(read_weights(text), os.fspath(text))
        original |= text_part
        dropped |= text_dropped
    model_state = model.state_dict()
    _grow_vocabulary(original, model_state, grown)
    plan = plan_conversion({key: tuple(value.shape) for key, value in original.items()}, model, "pretrained")
    report = plan.report
    check_tied_duplicates(original, plan, model.all_tied_weights_keys)
    if report.dropped_unexpected:
        listing = "\n".join(f"  {key}: {why}" for key, why in report.dropped_unexpected.items())
        raise PretrainedSourceError(f"tensors of the sources have no place in {report.head}:\n{listing}")
    with torch.no_grad():
        model.load_state_dict(planned_state_dict(original, plan), strict=False)
    report.resized |= grown  # after loading: the plan resizes the entries of `resized` it made itself
    report.dropped_expected |= dropped
    if hasattr(model, "restart_momentum_encoders"):  # a pretraining model: its momentum copies start as the online
        model.restart_momentum_encoders()
    _explain_new_tensors(report, vision is not None, text is not None)
    log_report(report)
    return report


def blip_tokenizer_for(text_source: str | os.PathLike):
    """BLIP's tokenizer from a text source's vocabulary (its `vocab.txt`, or the vocabulary of its `tokenizer.json`):
    bert-base-uncased's gives `[DEC]` = 30522 and `[ENC]` = 30523."""
    from transformers import AutoTokenizer

    from ..processing_blip import build_tokenizer

    path = _local_files(os.fspath(text_source))
    directory = path if path.is_dir() else path.parent
    if (directory / "vocab.txt").exists():
        return build_tokenizer(vocab_file=str(directory / "vocab.txt"))
    if not (directory / "tokenizer.json").exists():
        raise PretrainedSourceError(f"{text_source}: no vocab.txt or tokenizer.json to build the tokenizer from")
    vocab = AutoTokenizer.from_pretrained(directory).get_vocab()
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file = Path(scratch) / "vocab.txt"
        vocab_file.write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)), encoding="utf-8")
        return build_tokenizer(vocab_file=str(vocab_file))


def _explain_new_tensors(report: ConversionReport, has_vision: bool, has_text: bool) -> None:
    """Moves the tensors no source holds from `missing` to `defaulted`, with where each one's value comes from, when
    BLIP starts them so; a tensor of a tower whose source was not given stays as initialised."""
    still_missing = []
    for key in report.missing:
        reason = next((why for pattern, why in _NEW_IN_BLIP if pattern.search(key)), None)
        if reason is None and key.startswith("vision_model") and not has_vision:
            reason = "not given a vision source: initialised randomly"
        if reason is None and key.startswith("text_") and not has_text:
            reason = "not given a text source: initialised randomly"
        if reason is None:
            still_missing.append(key)
        else:
            report.defaulted[key] = reason
    report.missing = still_missing


__all__ = [
    "PretrainedSourceError",
    "blip_tokenizer_for",
    "load_pretrained_encoders",
    "read_weights",
    "text_state_dict",
    "vision_state_dict",
]
