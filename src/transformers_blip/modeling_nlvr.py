"""NLVR2 (is a sentence true of a pair of images?): BLIP's image-grounded text encoder reading two images at once.

Every text layer cross-attends to the left and to the right image with an attention of its own (`self0`, `self1`);
their outputs are projected (`dense0`, `dense1`) and averaged in the lower layers, concatenated and merged by a
linear layer (`merge_layer`, no activation, as the original) from `config.nlvr_merge_from_layer` on. An MLP on the
`[ENC]` token classifies the pair: 1 true, 0 false. Both attentions start from the pretrained cross-attention
(`convert.pretraining.task_head_from_pretraining`). Module names are the original `blip_nlvr`'s, so its checkpoints
load as they are (`convert.original.load_original_checkpoint`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_blip import BlipConfig, BlipTextConfig
from .modeling_blip import BlipPreTrainedModel, check_batch_sizes, image_grounded_encoding
from .modeling_med import BlipTextModel, BlipTextSelfAttention, ImageKeyValues, hidden_states_requested
from .modeling_vision import BlipVisionModel

# Each of a layer's two image attentions, and their projections, starts from the one cross-attention that the other
# BLIP models have: `self0`, `self1` <- `self`; `dense0`, `dense1` <- `dense`.
_PAIR_ATTENTION_COPY = re.compile(r"(\.crossattention\.(?:self|output\.dense))[01]\.")
# Tensors of the NLVR2 head that no other BLIP model has: new when the head starts from one of them.
NEW_IN_NLVR_HEAD = re.compile(r"^cls_head\.|\.crossattention\.output\.merge_layer\.")


def single_attention_name(key: str) -> str:
    """The name, in a model with one cross-attention per layer, of the tensor that initialises the NLVR2 head's
    `key` (`...crossattention.self1.query.weight` -> `...crossattention.self.query.weight`); other keys as they are."""
    return _PAIR_ATTENTION_COPY.sub(r"\1.", key)


@dataclass
class BlipVisualReasoningOutput(ModelOutput):
    """Output of [`BlipForVisualReasoning`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): cross-entropy of the logits against `labels`.
        logits (`torch.FloatTensor` of shape `(B, 2)`): scores of "false" (0) and "true" (1).
        image_embeds (`torch.FloatTensor` of shape `(B, 2, 1 + N, D_v)`): the ViT's output for each pair.
        multimodal_embeds (`torch.FloatTensor` of shape `(B, L, D_t)`): the text encoder's output.
        vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the ViT's
            embeddings and each layer's output, each `(B, 2, 1 + N, D_v)`.
        multimodal_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the same for the text encoder, each
            `(B, L, D_t)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    multimodal_embeds: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    multimodal_hidden_states: tuple[torch.FloatTensor, ...] | None = None


class PairKeyValues(ImageKeyValues):
    """Cross-attention keys and values of both images of each pair: `key_values[i]` is layer i's
    `((left key, left value), (right key, right value))`. Images are never padded, so there is no mask."""

    @property
    def batch_size(self) -> int:
        return self.key_values[0][0][0].shape[0]


class BlipPairCrossAttentionOutput(nn.Module):
    """Projects each image's attention output, combines the two (mean, or concatenation + linear), then residual and
    LayerNorm as BERT's attention output."""

    def __init__(self, config: BlipTextConfig, merge: bool):
        super().__init__()
        self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.merge_layer = nn.Linear(2 * config.hidden_size, config.hidden_size) if merge else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, left: torch.Tensor, right: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        left, right = self.dense0(left), self.dense1(right)
        if self.merge_layer is not None:
            combined = self.merge_layer(torch.cat([left, right], dim=-1))
        else:
            combined = (left + right) / 2
        return self.LayerNorm(self.dropout(combined) + residual)


class BlipPairCrossAttention(nn.Module):
    """A text layer's cross-attention over two images; takes the place of `BlipTextLayer.crossattention`."""

    def __init__(self, config: BlipTextConfig, layer_idx: int, merge: bool):
        super().__init__()
        self.self0 = BlipTextSelfAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.self1 = BlipTextSelfAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.output = BlipPairCrossAttentionOutput(config, merge)

    def project_key_values(self, left: torch.Tensor, right: torch.Tensor) -> tuple[tuple, tuple]:
        return self.self0.project_key_value(left), self.self1.project_key_value(right)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        attention_mask: None = None,
    ) -> torch.Tensor:
        left_key_value, right_key_value = key_value
        left = self.self0(hidden_states, key_value=left_key_value)
        right = self.self1(hidden_states, key_value=right_key_value)
        return self.output(left, right, hidden_states)


class BlipForVisualReasoning(BlipPreTrainedModel):
    """NLVR2: classifies whether a sentence is true of a pair of images (left, right)."""

    main_input_name = "pixel_values"
    _no_split_modules = ["BlipVisionLayer", "BlipTextLayer", "BlipTextEmbeddings"]

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        text_config = config.text_config
        if not text_config.add_cross_attention:
            raise ValueError("BlipForVisualReasoning cross-attends to the images: text_config.add_cross_attention")
        if not 0 <= config.nlvr_merge_from_layer <= text_config.num_hidden_layers:
            raise ValueError(
                f"nlvr_merge_from_layer ({config.nlvr_merge_from_layer}) must lie in "
                f"[0, {text_config.num_hidden_layers}], the number of text layers"
            )
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(text_config)
        for index, layer in enumerate(self.text_encoder.encoder.layer):
            layer.crossattention = BlipPairCrossAttention(
                text_config, index, merge=index >= config.nlvr_merge_from_layer
            )
        width = text_config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def pair_key_values(self, image_embeds: torch.Tensor) -> PairKeyValues:
        """Every layer's cross-attention keys/values for pairs of ViT outputs (B, 2, 1 + N, D_v)."""
        left, right = image_embeds[:, 0], image_embeds[:, 1]
        return PairKeyValues(
            [layer.crossattention.project_key_values(left, right) for layer in self.text_encoder.encoder.layer]
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BlipVisualReasoningOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): the tokenized sentences, `[CLS]` first (`[ENC]` is put
                in its place here).
            pixel_values (`torch.FloatTensor` of shape `(B, 2, 3, H, W)`): each sentence's left and right image.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for tokens to attend to.
            labels (`torch.LongTensor` of shape `(B,)`, *optional*): 1 if the sentence is true of the pair, else 0.
            output_hidden_states (`bool`, *optional*): also return every layer's states of the ViT and of the text
                encoder (default: the config's).
            output_attentions (`bool`, *optional*): refused when true: attention weights are not returned.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        if pixel_values.ndim != 5 or pixel_values.shape[1] != 2:
            raise ValueError(
                f"pixel_values must hold a pair of images per sentence, shape (B, 2, 3, H, W); got "
                f"{tuple(pixel_values.shape)}"
            )
        check_batch_sizes(pixel_values, input_ids)
        batch_size = pixel_values.shape[0]
        vision_output = self.vision_model(pixel_values.flatten(0, 1), output_hidden_states=output_hidden_states)

        def as_pairs(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch_size, 2, *states.shape[1:])  # (2B, 1 + N, D_v) -> (B, 2, 1 + N, D_v)

        image_embeds = as_pairs(vision_output.last_hidden_state)
        text_output = image_grounded_encoding(
            self.text_encoder,
            input_ids,
            attention_mask,
            image_key_values=self.pair_key_values(image_embeds),
            output_hidden_states=output_hidden_states,
        )
        multimodal_embeds = text_output.last_hidden_state
        logits = self.cls_head(multimodal_embeds[:, 0])
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        vision_hidden_states = None
        if vision_output.hidden_states is not None:
            vision_hidden_states = tuple(as_pairs(states) for states in vision_output.hidden_states)
        return BlipVisualReasoningOutput(
            loss=loss,
            logits=logits,
            image_embeds=image_embeds,
            multimodal_embeds=multimodal_embeds,
            vision_hidden_states=vision_hidden_states,
            multimodal_hidden_states=text_output.hidden_states,
        )


__all__ = [
    "NEW_IN_NLVR_HEAD",
    "BlipForVisualReasoning",
    "BlipPairCrossAttention",
    "BlipVisualReasoningOutput",
    "PairKeyValues",
    "single_attention_name",
]
