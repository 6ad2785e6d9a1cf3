"""The MED text model of BLIP: one BERT that is a text encoder, an image-grounded encoder or an image-grounded decoder.

`BlipTextModel.forward(mode=...)` is the only place that knows the three modes:

- `"text"`: bidirectional self-attention, no cross-attention (the unimodal encoder of ITC);
- `"multimodal"`: bidirectional self-attention plus cross-attention to image embeddings (ITM, VQA questions);
- `"decoder"`: causal self-attention plus cross-attention (captioning, answers), with a key/value cache.

Layers never see the mode: they cross-attend when they are handed image states. Parameter names follow BERT (and so
the original `med.py` and transformers' BLIP text model), so both checkpoints load without renaming.

Generation computes the cross-attention keys and values once per image (`BlipTextModel.image_key_values`) and shares
them between all the beams or samples of that image: the query rows of an image's beams are stacked along the
sequence axis, so the attention reads the image's keys without copying them per beam.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from .configuration_blip import BlipTextConfig

TEXT_MODES = ("text", "multimodal", "decoder")


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention. query (B, H, Lq, d), key/value (B, H, Lk, d), additive mask; returns (B, Lq, H, d)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Lq, Lk)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, Lq, H, d)
    return attn_output, attn_weights


@dataclass
class ImageKeyValues:
    """Cross-attention keys and values of every layer for a batch of images, computed once and reused.

    `key_values[i]` holds layer i's (key, value), each (B_img, H, N, d). `attention_mask` is the additive mask
    (B_img, 1, 1, N) of the image (or question) tokens, or `None` when every token is attended to. A batch of queries
    may hold several rows per image (beams, samples), grouped consecutively as `generate` lays them out.
    """

    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    attention_mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.key_values[0][0].shape[0]


def refuse_attention_weights(output_attentions: bool | None, model_name: str) -> None:
    """BLIP's attention does not hand its weights back (SDPA never forms them): say so rather than return nothing."""
    if output_attentions:
        raise ValueError(
            f"output_attentions=True is not supported by {model_name}: its attention does not return attention "
            "weights (SDPA never materialises them). Use output_hidden_states=True for the layers' states."
        )


def hidden_states_requested(
    model: PreTrainedModel, output_hidden_states: bool | None, output_attentions: bool | None
) -> bool:
    """Whether a call returns hidden states: the argument, else the model config's `output_hidden_states`, as in
    transformers. Attention weights, asked for by argument or by the config, are refused."""
    if output_attentions is None:
        output_attentions = model.config.output_attentions
    refuse_attention_weights(output_attentions, type(model).__name__)
    return bool(model.config.output_hidden_states if output_hidden_states is None else output_hidden_states)


def mask_padding(token_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """LM targets from token ids (B, L): a copy with every `[PAD]` set to -100, which the loss ignores."""
    return token_ids.masked_fill(token_ids == pad_token_id, -100)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turns a 0/1 (or bool) keep-mask into an additive one: 0 where kept, the dtype's minimum where masked."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep.bool(), torch.finfo(dtype).min)


class BlipTextEmbeddings(nn.Module):
    """Word and position embeddings (no token types), LayerNorm, dropout."""

    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        max_positions = self.position_embeddings.num_embeddings
        if past_length + seq_len > max_positions:
            raise ValueError(
                f"input_ids has {past_length + seq_len} tokens (including {past_length} cached), more than the "
                f"{max_positions} position embeddings of the text model; truncate the text (max_length=...)"
            )
        positions = torch.arange(past_length, past_length + seq_len, device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, D)
        return self.dropout(self.LayerNorm(embeddings))


class BlipTextSelfAttention(nn.Module):
    """Multi-head attention over the text itself or, when `is_cross_attention`, over image (or question) states."""

    def __init__(self, config: BlipTextConfig, is_cross_attention: bool, layer_idx: int):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_cross_attention = is_cross_attention
        self.is_causal = False  # decided per call by the mode, passed explicitly
        self.layer_idx = layer_idx
        key_value_width = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(key_value_width, config.hidden_size)
        self.value = nn.Linear(key_value_width, config.hidden_size)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, _ = states.shape
        return states.view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)

    def project_key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.key(states)), self.split_heads(self.value(states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: Cache | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Self-attention reads `hidden_states` (and `cache`); cross-attention reads the precomputed `key_value`."""
        batch_size, seq_len, width = hidden_states.shape
        query = self.split_heads(self.query(hidden_states))  # (B, H, L, d)
        if self.is_cross_attention:
            key, value = key_value
        else:
            key, value = self.project_key_value(hidden_states)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)

        # Several query rows per image (beams, samples): stack them along the sequence axis instead of copying keys.
        group = batch_size // key.shape[0]
        if group > 1:
            query = query.view(key.shape[0], group, self.num_heads, seq_len, self.head_dim)
            query = query.transpose(1, 2).reshape(key.shape[0], self.num_heads, group * seq_len, self.head_dim)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            is_causal=is_causal,
        )
        # (B_kv, group*L, H, d) -> (B, L, D): the group axis folds back into the batch in generate's order.
        return attn_output.reshape(batch_size, seq_len, width)


class BlipTextSelfOutput(nn.Module):
    """Output projection, dropout, residual and LayerNorm after an attention block (BERT's post-norm)."""

    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BlipTextAttention(nn.Module):
    def __init__(self, config: BlipTextConfig, is_cross_attention: bool, layer_idx: int):
        super().__init__()
        self.self = BlipTextSelfAttention(config, is_cross_attention, layer_idx)
        self.output = BlipTextSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        return self.output(self.self(hidden_states, **attention_kwargs), hidden_states)


class BlipTextIntermediate(nn.Module):
    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BlipTextOutput(nn.Module):
    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BlipTextLayer(GradientCheckpointingLayer):
    """Self-attention, then cross-attention when image key/values are given, then the feed-forward."""

    def __init__(self, config: BlipTextConfig, layer_idx: int):
        super().__init__()
        self.attention = BlipTextAttention(config, is_cross_attention=False, layer_idx=layer_idx)
        if config.add_cross_attention:
            self.crossattention = BlipTextAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        image_attention_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        hidden_states = self.attention(hidden_states, attention_mask=attention_mask, is_causal=is_causal, cache=cache)
        if image_key_value is not None:
            hidden_states = self.crossattention(
                hidden_states, attention_mask=image_attention_mask, key_value=image_key_value
            )
        return self.output(self.intermediate(hidden_states), hidden_states)


class BlipTextEncoder(nn.Module):
    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.layer = nn.ModuleList([BlipTextLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False


class BlipTextPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for the MED text models."""

    config_class = BlipTextConfig
    config: BlipTextConfig
    base_model_prefix = "bert"
    input_modalities = ("text",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False  # masks are additive tensors
    _supports_flex_attn = False
    _no_split_modules = ["BlipTextLayer", "BlipTextEmbeddings"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, BlipTextLMPredictionHead):
            init.zeros_(module.bias)


class BlipTextModel(BlipTextPreTrainedModel):
    """The MED text model. See the module docstring for its three modes."""

    def __init__(self, config: BlipTextConfig):
        super().__init__(config)
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = BlipTextEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.word_embeddings = value

    def image_key_values(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> ImageKeyValues:
        """Projects image (or question) states (B_img, N, D_enc) into every layer's cross-attention keys/values."""
        if not self.config.add_cross_attention:
            raise ValueError("this text model was built without cross-attention (add_cross_attention=False)")
        key_values = [
            layer.crossattention.self.project_key_value(encoder_hidden_states) for layer in self.encoder.layer
        ]
        mask = None
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            mask = additive_mask(encoder_attention_mask[:, None, None, :], encoder_hidden_states.dtype)
        return ImageKeyValues(key_values, mask)

    def _self_attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        mode: str,
        query_len: int,
        past_length: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor | None, bool]:
        """The self-attention mask of a mode: (additive mask or None, is_causal for the kernel)."""
        key_len = past_length + query_len
        padded = attention_mask is not None and not bool(attention_mask.all())
        if mode != "decoder":
            return (additive_mask(attention_mask[:, None, None, :], dtype) if padded else None), False
        if query_len == 1 and not padded:
            return None, False  # one new token sees every cached one
        if not padded and past_length == 0 and self.config._attn_implementation == "sdpa":
            return None, True  # let the kernel apply the causal pattern itself
        positions = torch.arange(key_len, device=device)
        keep = positions[None, :] <= (positions[past_length:, None])  # (Lq, Lk): key j visible from query i
        keep = keep[None, None]  # (1, 1, Lq, Lk)
        if attention_mask is not None:
            keep = keep & attention_mask[:, None, None, :key_len].bool()  # (B, 1, Lq, Lk)
        return additive_mask(keep, dtype), False

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mode: str = "text",
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): token ids; the caller puts `[CLS]`, `[ENC]` or `[DEC]`
                first as the mode requires (the task heads do it).
            attention_mask (`torch.Tensor` of shape `(B, L_past + L)`, *optional*): 1 for tokens to attend to.
            mode (`str`): `"text"`, `"multimodal"` or `"decoder"`.
            encoder_hidden_states (`torch.Tensor` of shape `(B_img, N, D_enc)`, *optional*): what the cross-attention
                reads in the image-grounded modes. `B` may be a multiple of `B_img` (several rows per image).
            encoder_attention_mask (`torch.Tensor` of shape `(B_img, N)`, *optional*): 1 for states to attend to.
            image_key_values (`ImageKeyValues`, *optional*): the cross-attention keys/values already projected, in
                place of `encoder_hidden_states` (generation computes them once per image).
            cache (`Cache`, *optional*): self-attention key/value cache of the decoder.
            use_cache (`bool`, *optional*): in decoder mode, create and return a cache when none is given.
            output_hidden_states (`bool`, *optional*): also return the embeddings and every layer's output
                (`hidden_states`); defaults to the config's `output_hidden_states`.
            output_attentions (`bool`, *optional*): refused when true: attention weights are not returned.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        if mode not in TEXT_MODES:
            raise ValueError(f"mode must be one of {TEXT_MODES}, got {mode!r}")
        if input_ids is None:
            raise ValueError("input_ids is required")
        grounded = encoder_hidden_states is not None or image_key_values is not None
        if mode == "text" and grounded:
            raise ValueError('mode="text" is the unimodal encoder: pass no encoder_hidden_states / image_key_values')
        if mode != "text" and not grounded:
            raise ValueError(f'mode="{mode}" cross-attends to the image: pass encoder_hidden_states')
        if mode != "decoder" and cache is not None:
            raise ValueError(f'a key/value cache is only meaningful in mode="decoder", got mode="{mode}"')
        if mode == "decoder" and cache is None and use_cache:
            cache = DynamicCache(config=self.config)

        past_length = cache.get_seq_length() if cache is not None else 0
        hidden_states = self.embeddings(input_ids, past_length=past_length)  # (B, L, D)
        self_mask, is_causal = self._self_attention_mask(
            attention_mask, mode, input_ids.shape[1], past_length, hidden_states.dtype, hidden_states.device
        )
        if encoder_hidden_states is not None and image_key_values is None:
            image_key_values = self.image_key_values(encoder_hidden_states, encoder_attention_mask)
        if image_key_values is not None and input_ids.shape[0] % image_key_values.batch_size != 0:
            raise ValueError(
                f"the text batch ({input_ids.shape[0]}) must be a multiple of the image batch "
                f"({image_key_values.batch_size}): pass one image per text, or the same number of texts per image"
            )

        all_hidden_states = [hidden_states] if output_hidden_states else None
        for i, layer in enumerate(self.encoder.layer):
            hidden_states = layer(
                hidden_states,
                self_mask,
                image_key_values.key_values[i] if image_key_values is not None else None,
                image_key_values.attention_mask if image_key_values is not None else None,
                is_causal=is_causal,
                cache=cache,
            )
            if output_hidden_states:
                all_hidden_states.append(hidden_states)

        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )


class BlipTextPredictionHeadTransform(nn.Module):
    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BlipTextLMPredictionHead(nn.Module):
    """Transform, then a vocabulary projection tied to the word embeddings, with its own bias."""

    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.transform = BlipTextPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class BlipTextOnlyMLMHead(nn.Module):
    def __init__(self, config: BlipTextConfig):
        super().__init__()
        self.predictions = BlipTextLMPredictionHead(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden_states)


def language_modeling_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross entropy: logits (B, L, V) predict labels shifted by one; -100 labels are ignored.

    `reduction="mean"` averages over every kept token of the batch; `"none"` returns each sequence's sum (B,).
    """
    shifted_logits = logits[:, :-1].float()  # (B, L-1, V)
    shifted_labels = labels[:, 1:]  # (B, L-1)
    loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="none" if reduction == "none" else "mean",
    )
    if reduction == "none":
        return loss.view(labels.shape[0], -1).sum(dim=1)
    return loss


class BlipTextLMHeadModel(BlipTextPreTrainedModel, GenerationMixin):
    """The image-grounded decoder: [`BlipTextModel`] in `"decoder"` mode plus the tied LM head."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: BlipTextConfig):
        super().__init__(config)
        self.bert = BlipTextModel(config)
        self.cls = BlipTextOnlyMLMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.bert.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        image_key_values: ImageKeyValues | None = None,
        labels: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        reduction: str = "mean",
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> CausalLMOutputWithCrossAttentions:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(B, L)`, *optional*): targets aligned with `input_ids` (the loss
                shifts them); -100 marks tokens without loss (pads, prompt).
            reduction (`str`): `"mean"` over all kept tokens, or `"none"` for each sequence's summed loss (B,).
            logits_to_keep (`int`): compute logits for the last n positions only (0: all); generation keeps 1.
            Other arguments as [`BlipTextModel.forward`] in `"decoder"` mode.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        if labels is not None:
            use_cache = False
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            mode="decoder",
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            image_key_values=image_key_values,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.cls(hidden_states)  # (B, L, V)

        loss = None
        if labels is not None:
            loss = language_modeling_loss(logits, labels, self.config.label_smoothing, reduction)
        return CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = [
    "BlipTextLMHeadModel",
    "BlipTextModel",
    "BlipTextPreTrainedModel",
    "ImageKeyValues",
    "TEXT_MODES",
    "language_modeling_loss",
    "hidden_states_requested",
    "mask_padding",
    "refuse_attention_weights",
]
