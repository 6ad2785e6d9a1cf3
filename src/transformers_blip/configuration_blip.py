"""Configurations of BLIP: the ViT vision encoder, the MED text model and the composite model.

The defaults reproduce the original release: ViT-B/16 and BERT-base with cross-attention, the vocabulary of
bert-base-uncased plus `[DEC]` and `[ENC]`. Our `model_type`s are our own (`tblip*`); transformers owns `blip`, and
its configs are translated by `BlipConfig.from_transformers_dict`.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

# Fields of transformers' own BLIP text/vision configs that mean the same thing in ours.
_SHARED_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "pad_token_id",
    "sep_token_id",
    "label_smoothing",
)
_SHARED_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)


# Arguments of `from_pretrained` that locate files rather than set config fields.
_LOADING_ARGUMENTS = {
    "cache_dir",
    "force_download",
    "local_files_only",
    "token",
    "revision",
    "subfolder",
    "proxies",
    "trust_remote_code",
    "_from_auto",
    "_from_pipeline",
    "_commit_hash",
    "user_agent",
}


def _config_overrides(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _LOADING_ARGUMENTS}


def check_gradient_checkpointing_layers(value: int | None) -> None:
    """Refuses a `gradient_checkpointing_layers` that is neither `None` nor a non-negative count of blocks."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"gradient_checkpointing_layers must be None (every ViT block) or a number of last blocks >= 0, "
            f"got {value!r}"
        )


class BlipVisionConfig(PretrainedConfig):
    r"""
    Configuration of [`BlipVisionModel`], the ViT image encoder of BLIP (timm-style: pre-norm blocks, fused qkv,
    final LayerNorm, no classification head).

    Args:
        hidden_size (`int`, defaults to 768): width of the encoder (1024 for ViT-L).
        intermediate_size (`int`, defaults to 3072): width of the MLP inside each block.
        num_hidden_layers (`int`, defaults to 12): number of blocks (24 for ViT-L).
        num_attention_heads (`int`, defaults to 12): attention heads per block (16 for ViT-L).
        image_size (`int`, defaults to 384): size the position embeddings are laid out for. Other input sizes are
            served by resizing the patch-grid position embeddings bicubically on the fly.
        patch_size (`int`, defaults to 16): side of the square patches.
        num_channels (`int`, defaults to 3): input channels.
        hidden_act (`str`, defaults to `"gelu"`): activation of the MLP.
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon; the original uses 1e-6 (transformers' own
            BLIP config defaults to 1e-5, and a loaded config keeps whatever it names).
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, rising linearly to this rate over the blocks
            (0.1 for ViT-L in the original). The blocks read it at every call, so a value set on the config of a built
            model takes effect too.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal init.
        gradient_checkpointing_layers (`int`, *optional*): which blocks recompute their activations in the backward
            pass once gradient checkpointing is enabled (`model.activation_checkpointing_enable()`, or Trainer's
            `--gradient_checkpointing`): `None` every block, `N` only the last `N` (the original's `vit_ckpt_layer`),
            `0` none, as in the original; `N` above the depth means every block. Read at every call.
    """

    model_type = "tblip_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        image_size: int = 384,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        initializer_range: float = 0.02,
        gradient_checkpointing_layers: int | None = None,
        **kwargs,
    ):
        check_gradient_checkpointing_layers(gradient_checkpointing_layers)
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.attention_dropout = attention_dropout
        self.drop_path_rate = drop_path_rate
        self.initializer_range = initializer_range
        self.gradient_checkpointing_layers = gradient_checkpointing_layers
        super().__init__(**kwargs)


class BlipTextConfig(PretrainedConfig):
    r"""
    Configuration of the MED text model ([`BlipTextModel`], [`BlipTextLMHeadModel`]): BERT without token types or
    pooler, with a cross-attention block in every layer whose keys and values read the image embeddings.

    Args:
        vocab_size (`int`, defaults to 30524): bert-base-uncased's 30522 tokens plus `[DEC]` and `[ENC]`.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, max_position_embeddings, hidden_act,
        layer_norm_eps, initializer_range: as in BERT (BERT-base defaults).
        hidden_dropout_prob (`float`, defaults to 0.1), attention_probs_dropout_prob (`float`, defaults to 0.1):
            BERT's dropouts, as the original's `med_config.json`.
        encoder_hidden_size (`int`, defaults to 768): width of the states the cross-attention reads. In a
            [`BlipConfig`] it is always derived there: the vision width for the models that read the image, the text
            width for VQA's answer decoder, which reads the question (`BlipConfig.answer_decoder_config()`).
        add_cross_attention (`bool`, defaults to `True`): build a cross-attention block in every layer. Whether a call
            uses it is decided by the `mode` argument of [`BlipTextModel.forward`], not by this flag.
        label_smoothing (`float`, defaults to 0.1): label smoothing of the language-modelling loss.
        pad_token_id (`int`, defaults to 0), sep_token_id (`int`, defaults to 102): `[PAD]` and `[SEP]`; `[SEP]` ends
            generation (it is also `eos_token_id`).
        decoder_bos_token_id (`int`, *optional*): id of `[DEC]`, the decoder's first token. Defaults to
            `vocab_size - 2`, BLIP's convention.
        encoder_token_id (`int`, *optional*): id of `[ENC]`, which replaces `[CLS]` for image-grounded encoding.
            Defaults to `vocab_size - 1`.
    """

    model_type = "tblip_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 30524,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        max_position_embeddings: int = 512,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-12,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        initializer_range: float = 0.02,
        encoder_hidden_size: int = 768,
        add_cross_attention: bool = True,
        label_smoothing: float = 0.1,
        pad_token_id: int = 0,
        sep_token_id: int = 102,
        decoder_bos_token_id: int | None = None,
        encoder_token_id: int | None = None,
        **kwargs,
    ):
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.initializer_range = initializer_range
        self.encoder_hidden_size = encoder_hidden_size
        self.add_cross_attention = add_cross_attention
        self.label_smoothing = label_smoothing
        self.decoder_bos_token_id = vocab_size - 2 if decoder_bos_token_id is None else decoder_bos_token_id
        self.encoder_token_id = vocab_size - 1 if encoder_token_id is None else encoder_token_id
        # `[DEC]` starts and `[SEP]` ends every generated sequence: generate() reads these two names.
        kwargs["bos_token_id"] = self.decoder_bos_token_id
        kwargs["eos_token_id"] = sep_token_id
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(pad_token_id=pad_token_id, sep_token_id=sep_token_id, **kwargs)


class BlipConfig(PretrainedConfig):
    r"""
    Configuration of every BLIP head: a [`BlipVisionConfig`], a [`BlipTextConfig`] and the fields of the heads.

    Args:
        text_config (`dict` or [`BlipTextConfig`], *optional*): the MED text model.
        vision_config (`dict` or [`BlipVisionConfig`], *optional*): the ViT.
        embed_dim (`int`, defaults to 256): width of the ITC projections `vision_proj` and `text_proj`.
        itc_temperature (`float`, defaults to 0.07): initial ITC temperature (learnable, clamped to
            `[itc_temperature_min, itc_temperature_max]`).
        itc_temperature_min (`float`, defaults to 0.001), itc_temperature_max (`float`, defaults to 0.5): its range.
        prompt (`str`, defaults to `"a picture of "`): captioning prompt; its tokens are masked in the LM loss and
            stripped from generated captions.
        prompt_token_ids (`list[int]`, *optional*): the ids of `prompt`'s tokens (no special tokens) under the
            model's tokenizer, which the config cannot derive itself; the captioner masks them in the loss of every
            training text that starts with them. Set by whoever holds the tokenizer (the caption fine-tuning does);
            `None`: the texts are taken to carry no prompt.
        queue_size (`int`, defaults to 57600): size of the ITC feature queues of the pretraining/retrieval models.
        momentum (`float`, defaults to 0.995): EMA rate of the momentum encoders.
        alpha (`float`, defaults to 0.4): weight of the momentum model's soft ITC targets.
        alpha_warmup_steps (`int`, defaults to 0): steps over which alpha ramps linearly from 0 (0: no ramp).
        negative_all_rank (`bool`, defaults to `False`): draw ITM hard negatives from the batches of all ranks.
        itc_global_keys (`bool`, defaults to `False`): use the current step's momentum features of all ranks as ITC
            keys besides the queue, so that each rank's ITC sees the global batch at once.
        nlvr_merge_from_layer (`int`, *optional*): in the NLVR2 head, the first text layer whose two cross-attention
            outputs (one per image) are concatenated and projected rather than averaged. Defaults to half the text
            layers (6 of BERT-base's 12, as the original).
        drop_path_rate (`float`, *optional*): the ViT's stochastic depth, `vision_config.drop_path_rate` under a
            shorter name, so that `BlipConfig(drop_path_rate=0.1)` and `from_pretrained(path, drop_path_rate=0.1)`
            reach the ViT. Not a field of its own: reading or setting it reads or sets the vision config's.
    """

    model_type = "tblip"
    sub_configs = {"text_config": BlipTextConfig, "vision_config": BlipVisionConfig}

    def __init__(
        self,
        text_config: dict | BlipTextConfig | None = None,
        vision_config: dict | BlipVisionConfig | None = None,
        embed_dim: int = 256,
        itc_temperature: float = 0.07,
        itc_temperature_min: float = 0.001,
        itc_temperature_max: float = 0.5,
        prompt: str = "a picture of ",
        prompt_token_ids: list[int] | None = None,
        queue_size: int = 57600,
        momentum: float = 0.995,
        alpha: float = 0.4,
        alpha_warmup_steps: int = 0,
        negative_all_rank: bool = False,
        itc_global_keys: bool = False,
        nlvr_merge_from_layer: int | None = None,
        **kwargs,
    ):
        if isinstance(text_config, dict):
            text_config = BlipTextConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
        if isinstance(vision_config, dict):
            vision_config = BlipVisionConfig(**{k: v for k, v in vision_config.items() if k != "model_type"})
        self.text_config = text_config if text_config is not None else BlipTextConfig()
        self.vision_config = vision_config if vision_config is not None else BlipVisionConfig()
        # With `answer_decoder_config`, the one place where a text model learns the width of what it cross-attends to.
        self.text_config.encoder_hidden_size = self.vision_config.hidden_size
        self.embed_dim = embed_dim
        # Not named `temperature`: generate() would read that as a sampling temperature.
        self.itc_temperature = itc_temperature
        self.itc_temperature_min = itc_temperature_min
        self.itc_temperature_max = itc_temperature_max
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else None
        self.queue_size = queue_size
        self.momentum = momentum
        self.alpha = alpha
        self.alpha_warmup_steps = alpha_warmup_steps
        self.negative_all_rank = negative_all_rank
        self.itc_global_keys = itc_global_keys
        if nlvr_merge_from_layer is None:
            nlvr_merge_from_layer = self.text_config.num_hidden_layers // 2
        self.nlvr_merge_from_layer = nlvr_merge_from_layer
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    @property
    def drop_path_rate(self) -> float:
        """The ViT's stochastic depth: `vision_config.drop_path_rate`."""
        return self.vision_config.drop_path_rate

    @drop_path_rate.setter
    def drop_path_rate(self, value: float) -> None:
        self.vision_config.drop_path_rate = value

    def answer_decoder_config(self) -> BlipTextConfig:
        """The text config of VQA's answer decoder: it cross-attends to the question states, so its keys and values
        read the text width where `text_config` (the question encoder's) reads the ViT's."""
        answer_config = copy.deepcopy(self.text_config)
        answer_config.encoder_hidden_size = self.text_config.hidden_size
        return answer_config

    @classmethod
    def from_text_vision_configs(cls, text_config: BlipTextConfig, vision_config: BlipVisionConfig, **kwargs):
        """Builds a config from its two parts."""
        return cls(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), **kwargs)

    @classmethod
    def from_transformers_dict(cls, config_dict: dict[str, Any], **kwargs) -> BlipConfig:
        """Translates the `config.json` of transformers' own BLIP (`model_type: "blip"`) into ours.

        transformers names `[DEC]` as the text config's `bos_token_id` and does not name `[ENC]`; BLIP's convention
        (`[ENC]` = vocab size - 1) fills the gap.
        """
        text_dict = config_dict.get("text_config") or {}
        vision_dict = config_dict.get("vision_config") or {}
        text_kwargs = {k: text_dict[k] for k in _SHARED_TEXT_FIELDS if k in text_dict}
        vision_kwargs = {k: vision_dict[k] for k in _SHARED_VISION_FIELDS if k in vision_dict}
        if text_dict.get("bos_token_id") is not None:
            text_kwargs["decoder_bos_token_id"] = text_dict["bos_token_id"]
        # transformers' composite config carries the smoothing too, without passing it down: honour either.
        if "label_smoothing" not in text_kwargs and "label_smoothing" in config_dict:
            text_kwargs["label_smoothing"] = config_dict["label_smoothing"]
        # transformers' configs omit fields left at their defaults, which differ from ours in a few places.
        text_kwargs.setdefault("num_attention_heads", 8)
        text_kwargs.setdefault("hidden_dropout_prob", 0.0)
        text_kwargs.setdefault("attention_probs_dropout_prob", 0.0)
        text_kwargs.setdefault("label_smoothing", 0.0)
        vision_kwargs.setdefault("layer_norm_eps", 1e-5)
        embed_dim = config_dict.get("image_text_hidden_size", 256)
        return cls(
            text_config=BlipTextConfig(**text_kwargs),
            vision_config=BlipVisionConfig(**vision_kwargs),
            embed_dim=embed_dim,
            **kwargs,
        )

    def to_transformers_dict(self) -> dict[str, Any]:
        """The inverse of `from_transformers_dict`: a `config.json` for transformers' own BLIP classes."""
        text = {k: getattr(self.text_config, k) for k in _SHARED_TEXT_FIELDS}
        text["bos_token_id"] = self.text_config.decoder_bos_token_id
        text["eos_token_id"] = 2
        text["encoder_hidden_size"] = self.vision_config.hidden_size
        vision = {k: getattr(self.vision_config, k) for k in _SHARED_VISION_FIELDS}
        return {
            "model_type": "blip",
            "text_config": text,
            "vision_config": vision,
            "image_text_hidden_size": self.embed_dim,
            "label_smoothing": self.text_config.label_smoothing,
        }

    @classmethod
    def is_transformers_layout(cls, pretrained_model_name_or_path, **kwargs) -> bool:
        """Whether the checkpoint's `config.json` is transformers' own BLIP's (`model_type: "blip"`)."""
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return config_dict.get("model_type") == "blip"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> BlipConfig:
        config_dict, _ = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == "blip":
            return cls.from_dict(config_dict, **_config_overrides(kwargs))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # A checkpoint in transformers' own BLIP layout (the hub's `Salesforce/blip-*`) loads into our heads.
        if config_dict.get("model_type") == "blip":
            return_unused = kwargs.pop("return_unused_kwargs", False)
            config = cls.from_transformers_dict(config_dict)
            for key, value in kwargs.items():
                setattr(config, key, value)
            return (config, {}) if return_unused else config
        return super().from_dict(config_dict, **kwargs)


__all__ = ["BlipConfig", "BlipTextConfig", "BlipVisionConfig"]
