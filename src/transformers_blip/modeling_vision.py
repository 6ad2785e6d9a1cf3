"""The ViT image encoder of BLIP: patch embedding, `[CLS]`, learned positions, pre-norm blocks, final LayerNorm.

Parameter names follow transformers' BLIP vision model, so that its checkpoints load without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_blip import BlipVisionConfig, check_gradient_checkpointing_layers
from .modeling_med import hidden_states_requested


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
    """Plain softmax attention. query (B, H, Lq, d), key/value (B, H, Lk, d); returns (B, Lq, H, d)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, Lq, Lk)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, Lq, H, d)
    return attn_output, attn_weights


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drops the whole residual branch per sample, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


def square_grid_side(num_patches: int) -> int:
    """The side of the square patch grid that `num_patches` positions cover; an error if they cover none."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"ViT position embeddings for {num_patches} patches do not form a square grid: BLIP's ViT lays its "
            "positions out on a square grid of patches (1 + side * side rows, [CLS] first)"
        )
    return side


def interpolate_position_embedding(
    position_embedding: torch.Tensor, grid_height: int, grid_width: int
) -> torch.Tensor:
    """`(1, 1 + s*s, D)` ViT position embeddings laid out for a `grid_height` x `grid_width` patch grid.

    The patch positions are resized bicubically as an image of the square `s` x `s` grid (in float32, whatever the
    table's dtype); the `[CLS]` position is kept. The original fine-tuning resizes the same way (224 -> 384 px), so
    the model's runtime resizing and checkpoint conversion both call this function and agree exactly.
    """
    side = square_grid_side(position_embedding.shape[1] - 1)
    if (grid_height, grid_width) == (side, side):
        return position_embedding
    cls_position, patch_positions = position_embedding[:, :1], position_embedding[:, 1:]
    dim = patch_positions.shape[-1]
    patch_positions = patch_positions.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    patch_positions = F.interpolate(
        patch_positions.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
    ).to(cls_position.dtype)  # (1, D, h, w)
    patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
    return torch.cat([cls_position, patch_positions], dim=1)  # (1, 1 + h*w, D)


class BlipVisionEmbeddings(nn.Module):
    """Patch embedding, `[CLS]` token and learned positions, resized when the image size differs from the config."""

    def __init__(self, config: BlipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        num_patches = (config.image_size // config.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))

    def position_embedding_for(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embeddings for a patch grid, bicubically resized from the stored square grid if needed."""
        return interpolate_position_embedding(self.position_embedding, grid_height, grid_width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        target_dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(target_dtype))  # (B, D, h, w)
        grid_height, grid_width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, h*w, D)
        cls_tokens = self.class_embedding.expand(batch_size, -1, -1).to(target_dtype)
        embeddings = torch.cat([cls_tokens, patches], dim=1)  # (B, 1 + h*w, D)
        return embeddings + self.position_embedding_for(grid_height, grid_width).to(target_dtype)


class BlipVisionAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, config: BlipVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, seq_len, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
            is_causal=False,
        )
        return self.projection(attn_output.reshape(batch_size, seq_len, width))


class BlipVisionMLP(nn.Module):
    def __init__(self, config: BlipVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class BlipVisionLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)), each branch with stochastic depth.

    Its stochastic depth and whether it is checkpointed are read from the config at every call (`drop_path_rate`,
    `gradient_checkpointing_layers`), so that a config changed after the model is built takes effect.
    """

    def __init__(self, config: BlipVisionConfig, layer_index: int):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = BlipVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BlipVisionMLP(config)
        self._checkpointing_enabled = False

    @property
    def drop_path_rate(self) -> float:
        """This block's stochastic depth: rising linearly from 0 at the first block to the config's rate at the
        last, as timm's ViT (and so the original) spaces it."""
        last = max(self.config.num_hidden_layers - 1, 1)
        return self.config.drop_path_rate * self.layer_index / last

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether this block recomputes its activations in the backward pass: checkpointing is enabled on the model
        and the block is among the last `config.gradient_checkpointing_layers` (every block when that is `None`)."""
        return self._checkpointing_enabled and is_checkpointed_block(self.config, self.layer_index)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        # Set by transformers' `activation_checkpointing_enable()` / `..._disable()` on every layer.
        self._checkpointing_enabled = enabled

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        drop_path_rate = self.drop_path_rate
        attn_output = self.self_attn(self.layer_norm1(hidden_states))
        hidden_states = hidden_states + drop_path(attn_output, drop_path_rate, self.training)
        mlp_output = self.mlp(self.layer_norm2(hidden_states))
        return hidden_states + drop_path(mlp_output, drop_path_rate, self.training)


def is_checkpointed_block(config: BlipVisionConfig, layer_index: int) -> bool:
    """Whether block `layer_index` is among those `config.gradient_checkpointing_layers` names: every block for
    `None`, else the last N (the original's `i >= depth - vit_ckpt_layer`), so none for 0."""
    checkpointed = config.gradient_checkpointing_layers
    check_gradient_checkpointing_layers(checkpointed)
    if checkpointed is None:
        return True
    return layer_index >= config.num_hidden_layers - checkpointed


class BlipVisionEncoder(nn.Module):
    def __init__(self, config: BlipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([BlipVisionLayer(config, index) for index in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, output_hidden_states: bool = False):
        all_hidden_states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
        return hidden_states, all_hidden_states


class BlipVisionPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading for the ViT."""

    config_class = BlipVisionConfig
    config: BlipVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules = ["BlipVisionLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' `init` helpers leave tensors that a checkpoint already filled untouched.
        super()._init_weights(module)
        if isinstance(module, BlipVisionEmbeddings):
            init.trunc_normal_(module.position_embedding, std=self.config.initializer_range)
            init.trunc_normal_(module.class_embedding, std=self.config.initializer_range)


class BlipVisionModel(BlipVisionPreTrainedModel):
    """The ViT: pixels (B, 3, H, W) -> image embeddings (B, 1 + H*W/P^2, D), `[CLS]` first."""

    def __init__(self, config: BlipVisionConfig):
        super().__init__(config)
        self.embeddings = BlipVisionEmbeddings(config)
        self.encoder = BlipVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutputWithPooling:
        r"""
        Returns a `BaseModelOutputWithPooling` whose `last_hidden_state` (B, 1 + N, D) is LayerNormed and whose
        `pooler_output` (B, D) is its `[CLS]` row; `hidden_states` when asked for (or the config says so).
        `output_attentions=True` is refused: SDPA never forms the attention weights.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        if pixel_values is None:
            raise ValueError("pixel_values is required: a float tensor of shape (batch, 3, height, width)")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}"
            )
        hidden_states = self.embeddings(pixel_values)
        hidden_states, all_hidden_states = self.encoder(hidden_states, output_hidden_states=output_hidden_states)
        last_hidden_state = self.post_layernorm(hidden_states)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            hidden_states=tuple(all_hidden_states) if all_hidden_states is not None else None,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["BlipVisionModel", "BlipVisionPreTrainedModel", "interpolate_position_embedding", "square_grid_side"]
