"""BLIP task heads: features and ITC, captioning, image-text retrieval (ITC + ITM) and question answering.

Each head is built from [`BlipVisionModel`] and the MED text model ([`BlipTextModel`], [`BlipTextLMHeadModel`]);
module names follow transformers' BLIP (`vision_model`, `text_encoder`, `text_decoder`, `vision_proj`, `text_proj`,
`itm_head`), so checkpoints in its layout load as they are. The heads put `[ENC]` / `[DEC]` in place of the first
token themselves: callers pass ordinary tokenized text (`[CLS] ... [SEP]`).
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions, BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_blip import BlipConfig
from .hub import prepare_config_for_saving, upload_to_hub, write_hub_files
from .modeling_med import (
    BlipTextLMHeadModel,
    BlipTextModel,
    ImageKeyValues,
    hidden_states_requested,
    language_modeling_loss,
    mask_padding,
)
from .modeling_vision import BlipVisionModel


def replace_first_token(input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """A copy of `input_ids` (B, L) whose first column is `token_id` (`[ENC]` or `[DEC]` in place of `[CLS]`)."""
    input_ids = input_ids.clone()
    input_ids[:, 0] = token_id
    return input_ids


def check_batch_sizes(pixel_values: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Paired heads need one text per image; say which counts differ instead of failing deep inside attention."""
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"got {pixel_values.shape[0]} images (pixel_values) but {input_ids.shape[0]} texts (input_ids): "
            "image-text heads take one text per image"
        )


def refuse_token_types(token_type_ids: torch.Tensor | None) -> None:
    """BERT tokenizers return `token_type_ids`; BLIP's text model has no token types, so only all-zero ids (one
    segment, what a tokenizer gives a single text) mean what the model computes."""
    if token_type_ids is not None and bool(token_type_ids.any()):
        raise ValueError(
            "token_type_ids holds non-zero types, but BLIP's text model has no token type embeddings: pass one "
            "text per row (a single segment) or leave token_type_ids out"
        )


def itc_feature(projection: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """The ITC feature of encoder states (B, L, D): the `[CLS]` row projected and L2-normalised, (B, embed_dim)."""
    return F.normalize(projection(states[:, 0]), dim=-1)


def image_grounded_encoding(
    text_encoder: BlipTextModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    image_key_values: ImageKeyValues | None = None,
    output_hidden_states: bool = False,
) -> BaseModelOutputWithPastAndCrossAttentions:
    """Texts read against images (ITM, VQA questions, NLVR2): `[ENC]` in place of the first token, then the text
    encoder in `"multimodal"` mode over the image states or their precomputed cross-attention keys/values."""
    return text_encoder(
        replace_first_token(input_ids, text_encoder.config.encoder_token_id),
        attention_mask=attention_mask,
        mode="multimodal",
        encoder_hidden_states=encoder_hidden_states,
        image_key_values=image_key_values,
        output_hidden_states=output_hidden_states,
    )


def deprecated_alias(new_name: str):
    """Marks a method as the old name of `new_name`: it warns, then calls the decorated body (one release only)."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            warnings.warn(
                f"{type(self).__name__}.{method.__name__} is deprecated and will be removed in the next release: "
                f"use {new_name}",
                FutureWarning,
                stacklevel=2,
            )
            return method(self, *args, **kwargs)

        return wrapper

    return decorate


@dataclass
class BlipOutput(ModelOutput):
    """Output of [`BlipModel`].

    The encoders' full outputs are `vision_model_output` and `text_model_output`, as in transformers' `BlipOutput`.
    There is no `image_embeds` / `text_embeds` field: transformers uses those names for the projected features, which
    are `image_feat` / `text_feat` here, while our other heads' `image_embeds` is the ViT's output, as in transformers'
    captioning and ITM outputs.

    Args:
        logits_per_image (`torch.FloatTensor` of shape `(B_img, B_txt)`): ITC similarities divided by the temperature.
        logits_per_text (`torch.FloatTensor` of shape `(B_txt, B_img)`): the transpose.
        image_feat (`torch.FloatTensor` of shape `(B_img, embed_dim)`): normalised projected `[CLS]` of the image.
        text_feat (`torch.FloatTensor` of shape `(B_txt, embed_dim)`): normalised projected `[CLS]` of the text.
        vision_model_output (`BaseModelOutputWithPooling`): the ViT's output; `last_hidden_state` (B_img, 1 + N, D_v),
            and `hidden_states` with `output_hidden_states=True`.
        text_model_output (`BaseModelOutputWithPastAndCrossAttentions`): the unimodal text encoder's output;
            `last_hidden_state` (B_txt, L, D_t), and `hidden_states` with `output_hidden_states=True`.
    """

    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_feat: torch.FloatTensor | None = None
    text_feat: torch.FloatTensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPastAndCrossAttentions | None = None

    def to_tuple(self) -> tuple:
        # The nested outputs become tuples too, as in transformers' BlipOutput.
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


@dataclass
class BlipCaptionOutput(ModelOutput):
    """Output of [`BlipForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): label-smoothed LM loss over the caption tokens.
        logits (`torch.FloatTensor` of shape `(B, L, V)`): next-token logits of the decoder.
        image_embeds (`torch.FloatTensor` of shape `(B, 1 + N, D_v)`): the ViT's output.
        vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the ViT's
            embeddings and each layer's output, each `(B, 1 + N, D_v)`.
        decoder_hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the
            decoder's embeddings and each layer's output, each `(B, L, D_t)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BlipRetrievalOutput(ModelOutput):
    """Output of [`BlipForImageTextRetrieval`] for B image-text pairs.

    Args:
        itm_logits (`torch.FloatTensor` of shape `(B, 2)`): ITM head logits (not matched, matched) of each pair.
        itm_score (`torch.FloatTensor` of shape `(B,)`): probability that each pair matches.
        itc_similarity (`torch.FloatTensor` of shape `(B, B)`): cosine similarity of every image with every text
            (row: image, column: text).
        image_feat (`torch.FloatTensor` of shape `(B, embed_dim)`), text_feat (`torch.FloatTensor` of shape
            `(B, embed_dim)`): the normalised ITC features.
        image_embeds (`torch.FloatTensor` of shape `(B, 1 + N, D_v)`): the ViT's output.
        multimodal_embeds (`torch.FloatTensor` of shape `(B, L, D_t)`): the image-grounded encoder's output.
        vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the ViT's
            embeddings and each layer's output.
        text_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the same for the unimodal text encoder (ITC).
        multimodal_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the same for the image-grounded encoder
            (ITM).
    """

    itm_logits: torch.FloatTensor | None = None
    itm_score: torch.FloatTensor | None = None
    itc_similarity: torch.FloatTensor | None = None
    image_feat: torch.FloatTensor | None = None
    text_feat: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    multimodal_embeds: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    multimodal_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BlipQuestionAnsweringOutput(ModelOutput):
    """Output of [`BlipForQuestionAnswering`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): sum over answers of weight x answer LM loss, divided by
            the number of questions.
        logits (`torch.FloatTensor` of shape `(A, L_a, V)`, *optional*): answer decoder logits, one row per answer.
        image_embeds (`torch.FloatTensor` of shape `(B, 1 + N, D_v)`): the ViT's output.
        question_embeds (`torch.FloatTensor` of shape `(B, L_q, D_t)`): the image-grounded question encoding.
        vision_hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states=True`, the ViT's
            embeddings and each layer's output.
        question_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the same for the question encoder.
        answer_hidden_states (`tuple(torch.FloatTensor)`, *optional*): the same for the answer decoder, when answers
            are given; each `(A, L_a, D_t)`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    question_embeds: torch.FloatTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    question_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    answer_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BlipAnswerRanking(ModelOutput):
    """Result of [`BlipForQuestionAnswering.rank`].

    Args:
        answer_index (`torch.LongTensor` of shape `(B,)`): index of the best candidate for each question.
        topk_indices (`torch.LongTensor` of shape `(B, k)`): candidates kept by first-token probability.
        topk_log_probs (`torch.FloatTensor` of shape `(B, k)`): log-likelihood of each kept whole answer.
    """

    answer_index: torch.LongTensor | None = None
    topk_indices: torch.LongTensor | None = None
    topk_log_probs: torch.FloatTensor | None = None


class BlipPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading shared by every BLIP head."""

    config_class = BlipConfig
    config: BlipConfig
    base_model_prefix = "blip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["BlipVisionLayer", "BlipTextLayer", "BlipTextEmbeddings"]

    # The pipeline tasks a saved model of this head serves, and the hub's tag for its model card.
    pipeline_tasks: tuple[str, ...] = ()
    pipeline_tag: str | None = None
    # Auto classes besides the registered one that load this head from a saved directory with remote code.
    extra_auto_classes: tuple[str, ...] = ()
    # BLIP's generation settings for a generating head (beams, lengths); the token ids come from the config.
    generation_defaults: dict = {}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(getattr(module, "temp", None), nn.Parameter):
            init.constant_(module.temp, self.config.itc_temperature)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        """Saves weights (safetensors) and config, plus the pipeline file and a model card naming the task."""
        prepare_config_for_saving(self)
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if is_main_process:
            write_hub_files(self, save_directory)

    @functools.wraps(PreTrainedModel.push_to_hub)
    def push_to_hub(self, repo_id: str, **kwargs):
        # transformers' arguments, BLIP's model card (see `hub.upload_to_hub`).
        return upload_to_hub(self, repo_id, **kwargs)

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ):
        # Loads the generation config as transformers does; one saved by transformers' own BLIP names its ids in its
        # own way (`eos_token_id` 2, where generation must end at `[SEP]`) and lacks BLIP's settings.
        super().adjust_generation_fn(
            generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
        )
        if generation_config is not None or pretrained_model_name_or_path is None:
            return
        download_kwargs = {k: kwargs[k] for k in _DOWNLOAD_ARGUMENTS if k in kwargs}
        if BlipConfig.is_transformers_layout(pretrained_model_name_or_path, **download_kwargs):
            self.generation_config = translated_generation_config(
                self.generation_config, self.config, self.generation_defaults
            )


class ItcFeaturesMixin:
    """ITC features and the learned temperature, clamped as the original does, for every head with ITC (the feature
    and retrieval models here, the pretraining models in modeling_pretraining.py). The head provides `vision_model`,
    `text_encoder`, `vision_proj`, `text_proj` and `temp`."""

    def clamped_temperature(self) -> torch.Tensor:
        with torch.no_grad():
            self.temp.clamp_(self.config.itc_temperature_min, self.config.itc_temperature_max)
        return self.temp

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features (B, embed_dim)."""
        return itc_feature(self.vision_proj, self.vision_model(pixel_values).last_hidden_state)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised ITC text features (B, embed_dim) from the unimodal text encoder."""
        text_embeds = self.text_encoder(input_ids, attention_mask=attention_mask, mode="text").last_hidden_state
        return itc_feature(self.text_proj, text_embeds)


class BlipModel(ItcFeaturesMixin, BlipPreTrainedModel):
    """Image, text and multimodal features, and the ITC similarity with the learned temperature."""

    # pipeline("zero-shot-image-classification") ranks candidate labels by `logits_per_image`, as for CLIP.
    pipeline_tag = "zero-shot-image-classification"
    extra_auto_classes = ("AutoModelForZeroShotImageClassification",)

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.itc_temperature))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def get_multimodal_features(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image-grounded text states (B, L, D_t), `[ENC]` first; row 0 is the pair's joint representation."""
        check_batch_sizes(pixel_values, input_ids)
        image_embeds = self.vision_model(pixel_values).last_hidden_state
        return image_grounded_encoding(
            self.text_encoder, input_ids, attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BlipOutput:
        r"""
        ITC logits of every image (B_img) with every text (B_txt), and both encoders' outputs.

        Args:
            token_type_ids (`torch.LongTensor` of shape `(B_txt, L)`, *optional*): accepted as a BERT tokenizer
                returns them (pipeline("zero-shot-image-classification") passes them on); they must be all zero.
            output_hidden_states (`bool`, *optional*): also return every layer's states, in
                `vision_model_output.hidden_states` and `text_model_output.hidden_states` (default: the config's).
            output_attentions (`bool`, *optional*): refused when true: attention weights are not returned.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        refuse_token_types(token_type_ids)
        vision_output = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        text_output = self.text_encoder(
            input_ids, attention_mask=attention_mask, mode="text", output_hidden_states=output_hidden_states
        )
        image_feat = itc_feature(self.vision_proj, vision_output.last_hidden_state)  # (B_img, E)
        text_feat = itc_feature(self.text_proj, text_output.last_hidden_state)  # (B_txt, E)
        logits_per_image = image_feat @ text_feat.t() / self.clamped_temperature()  # (B_img, B_txt)
        return BlipOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_feat=image_feat,
            text_feat=text_feat,
            vision_model_output=vision_output,
            text_model_output=text_output,
        )


def generation_settings(defaults: GenerationConfig, generate_kwargs: dict) -> dict:
    """The head's generation defaults overridden by the caller's keyword arguments, as `generate` expects them."""
    generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or defaults)
    _fit_default_lengths(generation_config, generate_kwargs)
    model_kwargs = generation_config.update(**generate_kwargs)  # returns what is not a generation setting
    return {"generation_config": generation_config, **model_kwargs}


def _fit_default_lengths(generation_config: GenerationConfig, generate_kwargs: dict) -> None:
    """Makes the head's default lengths give way to the caller's, so that generation has no conflict to warn of.

    A caller's `max_new_tokens` (`min_new_tokens`) replaces the default `max_length` (`min_length`) rather than
    joining it, and a caller's maximum below the default minimum (5 tokens for captions) lowers that minimum.
    """
    for new_tokens, length in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
        if generate_kwargs.get(new_tokens) is not None and length not in generate_kwargs:
            setattr(generation_config, length, None)
    if "min_length" in generate_kwargs or "min_new_tokens" in generate_kwargs or not generation_config.min_length:
        return
    max_new_tokens = generate_kwargs.get("max_new_tokens")
    caps = [generate_kwargs.get("max_length"), max_new_tokens + 1 if max_new_tokens is not None else None]  # + [DEC]
    generation_config.min_length = min([generation_config.min_length] + [cap for cap in caps if cap is not None])


# Arguments of `adjust_generation_fn` that say where a checkpoint's files are.
_DOWNLOAD_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
# Fields of a generation config that are token ids (named in transformers' BLIP's own way) or file bookkeeping.
_NOT_GENERATION_SETTINGS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"}


def default_generation_config(config: BlipConfig, **settings) -> GenerationConfig:
    """Generation settings of a head: `[DEC]` starts, `[SEP]` ends, `[PAD]` pads, plus the task's defaults."""
    text_config = config.text_config
    return GenerationConfig(
        bos_token_id=text_config.decoder_bos_token_id,
        eos_token_id=text_config.sep_token_id,
        pad_token_id=text_config.pad_token_id,
        **settings,
    )


def translated_generation_config(loaded: GenerationConfig, config: BlipConfig, defaults: dict) -> GenerationConfig:
    """A generation config loaded from transformers' BLIP layout, made ours: BLIP's token ids and `defaults`, except
    for the settings its `generation_config.json` states itself (none when transformers derived it from the model
    config, as `save_pretrained` of its BLIP does)."""
    stated = {} if loaded._from_model_config else loaded.to_diff_dict()
    settings = {k: v for k, v in stated.items() if k not in _NOT_GENERATION_SETTINGS and k != "transformers_version"}
    return default_generation_config(config, **{**defaults, **settings})


class BlipForConditionalGeneration(BlipPreTrainedModel, GenerationMixin):
    """Image captioning: the ViT and the image-grounded decoder.

    `generate` returns token ids that start with the prompt (as every decoder-only model in transformers does);
    `BlipImageTextProcessor.decode_captions` drops it. The defaults are the paper's: beam search with 3 beams, 5 to
    20 tokens.
    """

    main_input_name = "pixel_values"
    pipeline_tasks = ("image-to-text",)
    pipeline_tag = "image-to-text"
    generation_defaults = {"max_length": 20, "min_length": 5, "num_beams": 3}
    _tied_weights_keys = {
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
    }

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.post_init()
        self.generation_config = default_generation_config(config, **self.generation_defaults)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_decoder.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        return self.text_decoder.get_output_embeddings()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prompt_length: int | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BlipCaptionOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): the images.
            input_ids (`torch.LongTensor` of shape `(B, L)`): tokenized captions (`[CLS]` is replaced by `[DEC]`).
            labels (`torch.LongTensor` of shape `(B, L)`, *optional*): targets aligned with `input_ids`, usually
                `input_ids` itself. Pads, `[DEC]` and the prompt after it (see `prompt_length`) get no loss.
            prompt_length (`int`, *optional*): number of prompt tokens after `[DEC]` in every text, e.g. 3 for
                "a picture of " ("a", "picture", "of"; `training.captioning.caption_prompt_length` counts them);
                the original's `prompt_length` counts `[DEC]` too (4 for that prompt). 0: the texts carry no
                prompt. By default each text is looked at: one that starts with `config.prompt_token_ids` (the
                configured prompt's tokens) has them masked, as the original masks its prompt, and one that does not
                has only `[DEC]` masked, so that no caption word ever loses its loss.
            output_hidden_states (`bool`, *optional*): also return every layer's states (`vision_hidden_states`,
                `decoder_hidden_states`; default: the config's).
            output_attentions (`bool`, *optional*): refused when true: attention weights are not returned.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        check_batch_sizes(pixel_values, input_ids)
        if prompt_length is not None and not 0 <= prompt_length < input_ids.shape[1]:
            raise ValueError(
                f"prompt_length must be in [0, {input_ids.shape[1]}) for these texts, got {prompt_length}"
            )
        vision_output = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        image_embeds = vision_output.last_hidden_state
        decoder_input_ids = replace_first_token(input_ids, self.config.text_config.decoder_bos_token_id)
        outputs = self.text_decoder(
            decoder_input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            output_hidden_states=output_hidden_states,
        )
        loss = None
        if labels is not None:
            targets = mask_padding(labels, self.config.text_config.pad_token_id)
            # `[DEC]` and the prompt are given, not predicted.
            targets = targets.masked_fill(self._prompt_positions(input_ids, prompt_length), -100)
            loss = language_modeling_loss(outputs.logits, targets, self.config.text_config.label_smoothing)
        return BlipCaptionOutput(
            loss=loss,
            logits=outputs.logits,
            image_embeds=image_embeds,
            vision_hidden_states=vision_output.hidden_states,
            decoder_hidden_states=outputs.hidden_states,
        )

    def _prompt_positions(self, input_ids: torch.Tensor, prompt_length: int | None) -> torch.Tensor:
        """(B, L) True at `[DEC]` and at the prompt tokens that follow it: the first `prompt_length` when given,
        else `config.prompt_token_ids` in each row that starts with them (a row without them: `[DEC]` alone)."""
        batch_size, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)  # (L,)
        if prompt_length is None:
            prompt_ids = self.config.prompt_token_ids or []
            prompted = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)  # (B,)
            if 0 < len(prompt_ids) < length:
                expected = torch.tensor(prompt_ids, device=input_ids.device)  # (P,)
                prompted = (input_ids[:, 1 : len(prompt_ids) + 1] == expected).all(dim=1)
            lengths = prompted.long() * len(prompt_ids)  # (B,)
        else:
            lengths = torch.full((batch_size,), prompt_length, device=input_ids.device)
        return positions[None, :] <= lengths[:, None]  # (B, L)

    def _decoder_prompt(
        self, batch_size: int, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[DEC]` alone, or `[DEC]` + the prompt with its closing `[SEP]` removed (the decoder continues it)."""
        dec_id = self.config.text_config.decoder_bos_token_id
        if input_ids is None:
            return torch.full((batch_size, 1), dec_id, dtype=torch.long, device=device), None
        if input_ids.shape[0] != batch_size:
            raise ValueError(f"got {batch_size} images but {input_ids.shape[0]} prompts (input_ids)")
        if attention_mask is not None and not bool(attention_mask.all()):
            # Positions count from the first token, so a padded prompt would shift its continuation.
            raise ValueError("prompts of different lengths (padded input_ids) are not supported: group them by length")
        if bool((input_ids[:, -1] == self.config.text_config.sep_token_id).all()):
            input_ids = input_ids[:, :-1]
            attention_mask = attention_mask[:, :-1] if attention_mask is not None else None
        return replace_first_token(input_ids, dec_id), attention_mask

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        r"""
        Captions images: greedy, beam search or sampling, as `generate_kwargs` say (transformers' generate options).
        The image's cross-attention keys/values are computed once and shared by all its beams or samples.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): the images.
            input_ids (`torch.LongTensor` of shape `(B, L)`, *optional*): a tokenized prompt such as "a picture of ".
        Returns:
            `torch.LongTensor` of shape `(B * num_return_sequences, L_out)`: `[DEC]`, the prompt, the caption.
        """
        image_embeds = self.vision_model(pixel_values).last_hidden_state
        image_key_values = self.text_decoder.bert.image_key_values(image_embeds)
        decoder_input_ids, attention_mask = self._decoder_prompt(
            pixel_values.shape[0], input_ids, attention_mask, image_embeds.device
        )
        return self.text_decoder.generate(
            input_ids=decoder_input_ids,
            attention_mask=attention_mask,
            image_key_values=image_key_values,
            **generation_settings(self.generation_config, generate_kwargs),
        )


class BlipForImageTextRetrieval(ItcFeaturesMixin, BlipPreTrainedModel):
    """Image-text retrieval: ITC features (the unimodal encoders) and the ITM head (the image-grounded encoder)."""

    # No pipeline serves ITM; its ITC features are what the hub calls feature extraction.
    pipeline_tag = "feature-extraction"
    _keys_to_ignore_on_load_missing = [r"^temp$"]  # transformers' layout does not store the temperature

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(config.itc_temperature))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    @deprecated_alias("itc_feature(model.vision_proj, image_embeds), or get_image_features(pixel_values)")
    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Deprecated: normalised ITC image features (B, embed_dim) from ViT outputs."""
        return itc_feature(self.vision_proj, image_embeds)

    @deprecated_alias("get_text_features")
    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Deprecated name of `get_text_features`."""
        return self.get_text_features(input_ids, attention_mask)

    def itm_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM logits (B, 2) of texts against images; a text batch may hold several texts per image, grouped."""
        multimodal_embeds = image_grounded_encoding(
            self.text_encoder, input_ids, attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        return self.itm_head(multimodal_embeds[:, 0]), multimodal_embeds

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BlipRetrievalOutput:
        r"""
        Scores B image-text pairs: ITM logits for each pair and the ITC cosine similarity of every image with every
        text. Texts are ordinary tokenized text: `[ENC]` replaces `[CLS]` for the ITM pass here.

        Args:
            output_hidden_states (`bool`, *optional*): also return every layer's states of the ViT and of both text
                passes (default: the config's).
            output_attentions (`bool`, *optional*): refused when true: attention weights are not returned.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        check_batch_sizes(pixel_values, input_ids)
        vision_output = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        image_embeds = vision_output.last_hidden_state
        multimodal_output = image_grounded_encoding(
            self.text_encoder,
            input_ids,
            attention_mask,
            encoder_hidden_states=image_embeds,
            output_hidden_states=output_hidden_states,
        )
        itm_logits = self.itm_head(multimodal_output.last_hidden_state[:, 0])  # (B, 2)
        text_output = self.text_encoder(
            input_ids, attention_mask=attention_mask, mode="text", output_hidden_states=output_hidden_states
        )
        image_feat = itc_feature(self.vision_proj, image_embeds)  # (B, E)
        text_feat = itc_feature(self.text_proj, text_output.last_hidden_state)  # (B, E)
        return BlipRetrievalOutput(
            itm_logits=itm_logits,
            itm_score=itm_logits.softmax(dim=-1)[:, 1],
            itc_similarity=image_feat @ text_feat.t(),
            image_feat=image_feat,
            text_feat=text_feat,
            image_embeds=image_embeds,
            multimodal_embeds=multimodal_output.last_hidden_state,
            vision_hidden_states=vision_output.hidden_states,
            text_hidden_states=text_output.hidden_states,
            multimodal_hidden_states=multimodal_output.hidden_states,
        )


class BlipForQuestionAnswering(BlipPreTrainedModel, GenerationMixin):
    """Generative VQA: the question is encoded against the image (`[ENC]`), an answer decoder reads the question.

    Training takes several answers per question with weights (BLIP's VQA recipe); inference either generates an
    answer or ranks a candidate list (`rank`).
    """

    pipeline_tasks = ("visual-question-answering",)
    pipeline_tag = "visual-question-answering"
    generation_defaults = {"max_length": 10, "min_length": 1, "num_beams": 3}
    _tied_weights_keys = {
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
    }

    def __init__(self, config: BlipConfig):
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config)
        self.text_decoder = BlipTextLMHeadModel(config.answer_decoder_config())
        self.post_init()
        self.generation_config = default_generation_config(config, **self.generation_defaults)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def encode_question(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_embeds (B, 1+N, D_v), question_embeds (B, L_q, D_t)): the question read against its image."""
        vision_output, question_output = self._encode_question(input_ids, pixel_values, attention_mask)
        return vision_output.last_hidden_state, question_output.last_hidden_state

    def _encode_question(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        output_hidden_states: bool = False,
    ) -> tuple[BaseModelOutputWithPooling, BaseModelOutputWithPastAndCrossAttentions]:
        """The ViT's output and the image-grounded question encoder's."""
        check_batch_sizes(pixel_values, input_ids)
        vision_output = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        question_output = image_grounded_encoding(
            self.text_encoder,
            input_ids,
            attention_mask,
            encoder_hidden_states=vision_output.last_hidden_state,
            output_hidden_states=output_hidden_states,
        )
        return vision_output, question_output

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answer_counts: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BlipQuestionAnsweringOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L_q)`): tokenized questions.
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): the images.
            answer_input_ids (`torch.LongTensor` of shape `(A, L_a)`, *optional*): tokenized answers, all answers of
                question 0 first, then those of question 1, and so on. With them the loss is computed.
            answer_weights (`torch.FloatTensor` of shape `(A,)`, *optional*): weight of each answer (default 1).
            answer_counts (`torch.LongTensor` of shape `(B,)`, *optional*): answers per question (default 1 each).
            output_hidden_states (`bool`, *optional*): also return every layer's states (ViT, question encoder,
                answer decoder; default: the config's).
            output_attentions (`bool`, *optional*): refused when true: attention weights are not returned.
        """
        output_hidden_states = hidden_states_requested(self, output_hidden_states, output_attentions)
        vision_output, question_output = self._encode_question(
            input_ids, pixel_values, attention_mask, output_hidden_states
        )
        image_embeds, question_embeds = vision_output.last_hidden_state, question_output.last_hidden_state
        encodings = {
            "image_embeds": image_embeds,
            "question_embeds": question_embeds,
            "vision_hidden_states": vision_output.hidden_states,
            "question_hidden_states": question_output.hidden_states,
        }
        if answer_input_ids is None:
            return BlipQuestionAnsweringOutput(**encodings)

        batch_size = input_ids.shape[0]
        if answer_counts is None:
            answer_counts = torch.ones(batch_size, dtype=torch.long, device=input_ids.device)
        if int(answer_counts.sum()) != answer_input_ids.shape[0]:
            raise ValueError(
                f"answer_counts sums to {int(answer_counts.sum())} but answer_input_ids has "
                f"{answer_input_ids.shape[0]} answers"
            )
        if answer_weights is None:
            answer_weights = torch.ones(answer_input_ids.shape[0], device=question_embeds.device)
        # Each answer reads its own question's states.
        question_states = question_embeds.repeat_interleave(answer_counts, dim=0)  # (A, L_q, D)
        question_mask = attention_mask.repeat_interleave(answer_counts, dim=0) if attention_mask is not None else None
        decoder_input_ids = replace_first_token(answer_input_ids, self.config.text_config.decoder_bos_token_id)
        answer_output = self.text_decoder(
            decoder_input_ids,
            attention_mask=answer_attention_mask,
            encoder_hidden_states=question_states,
            encoder_attention_mask=question_mask,
            labels=mask_padding(decoder_input_ids, self.config.text_config.pad_token_id),
            reduction="none",
            output_hidden_states=output_hidden_states,
        )
        return BlipQuestionAnsweringOutput(
            loss=(answer_weights * answer_output.loss).sum() / batch_size,
            logits=answer_output.logits,
            answer_hidden_states=answer_output.hidden_states,
            **encodings,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        r"""
        Generates answers (defaults: beam search, 3 beams, at most 10 tokens). Returns `(B, L)` ids starting with
        `[DEC]`; decode with `skip_special_tokens=True`.
        """
        _, question_embeds = self.encode_question(input_ids, pixel_values, attention_mask)
        question_key_values = self.text_decoder.bert.image_key_values(question_embeds, attention_mask)
        bos = torch.full(
            (input_ids.shape[0], 1),
            self.config.text_config.decoder_bos_token_id,
            dtype=torch.long,
            device=input_ids.device,
        )
        return self.text_decoder.generate(
            input_ids=bos,
            image_key_values=question_key_values,
            **generation_settings(self.generation_config, generate_kwargs),
        )

    @torch.no_grad()
    def rank(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        candidate_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        candidate_attention_mask: torch.Tensor | None = None,
        k: int = 128,
        label_smoothing: float = 0.0,
    ) -> BlipAnswerRanking:
        r"""
        Picks each question's answer from a candidate list, as BLIP's `rank` inference: keep the `k` candidates whose
        first token is most probable, score each whole candidate, return the best.

        Args:
            candidate_input_ids (`torch.LongTensor` of shape `(C, L_a)`): tokenized candidate answers.
            k (`int`): candidates scored in full per question (capped at C).
            label_smoothing (`float`): a candidate's score is minus its summed LM loss with this smoothing: 0 gives
                its exact log-likelihood; the original ranks with its training smoothing (0.1).
        """
        _, question_embeds = self.encode_question(input_ids, pixel_values, attention_mask)
        question_key_values = self.text_decoder.bert.image_key_values(question_embeds, attention_mask)
        num_questions, num_candidates = question_embeds.shape[0], candidate_input_ids.shape[0]
        k = min(k, num_candidates)
        candidates = replace_first_token(candidate_input_ids, self.config.text_config.decoder_bos_token_id)

        # 1. First-token probabilities from one decoder step on `[DEC]`.
        first_logits = self.text_decoder(
            candidates[:1, :1].expand(num_questions, 1), image_key_values=question_key_values
        ).logits
        first_log_probs = first_logits[:, 0].log_softmax(dim=-1)  # (B, V)
        candidate_scores = first_log_probs[:, candidates[:, 1]]  # (B, C)
        topk_log_probs, topk_indices = candidate_scores.topk(k, dim=1)  # (B, k)

        # 2. Whole-answer log-likelihoods of the kept candidates; each question's k rows share its key/values.
        kept_ids = candidates[topk_indices.reshape(-1)]  # (B*k, L_a)
        kept_mask = (
            candidate_attention_mask[topk_indices.reshape(-1)] if candidate_attention_mask is not None else None
        )
        logits = self.text_decoder(kept_ids, attention_mask=kept_mask, image_key_values=question_key_values).logits
        targets = mask_padding(kept_ids, self.config.text_config.pad_token_id)
        answer_nll = language_modeling_loss(logits, targets, label_smoothing, reduction="none")  # (B*k,)
        answer_log_probs = -answer_nll.view(num_questions, k)  # (B, k)
        best = answer_log_probs.argmax(dim=1)
        return BlipAnswerRanking(
            answer_index=topk_indices.gather(1, best[:, None]).squeeze(1),
            topk_indices=topk_indices,
            topk_log_probs=answer_log_probs,
        )


__all__ = [
    "BlipAnswerRanking",
    "BlipCaptionOutput",
    "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval",
    "BlipForQuestionAnswering",
    "BlipModel",
    "BlipOutput",
    "BlipPreTrainedModel",
    "BlipQuestionAnsweringOutput",
    "BlipRetrievalOutput",
    "ItcFeaturesMixin",
    "image_grounded_encoding",
    "itc_feature",
    "replace_first_token",
]
