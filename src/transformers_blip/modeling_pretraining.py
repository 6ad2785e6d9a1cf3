"""BLIP pretraining: ITC with momentum distillation and feature queues, ITM with hard negatives, and LM, in one model.

`BlipContrastiveMatchingModel` is what pretraining and retrieval fine-tuning share (the original's `blip_pretrain.py`
and `blip_retrieval.py` hold two copies of it): the online and momentum encoders, the queues, ITC and ITM. The two
models differ in how ITM negatives are drawn (class attributes, below) and in what they add: `BlipForPreTraining` the
decoder and its LM loss, `BlipForRetrievalTraining` (modeling_retrieval_training.py) nothing: it only requires image
ids.

`BlipForPreTraining` holds the ViT, the MED text encoder, the image-grounded decoder, the projections and the ITM head,
plus momentum ("_m") copies of the ViT, the text encoder and both projections and the queues of their features. The
image-grounded encoder and the decoder share every parameter except their self-attention layers (the paper's best
setting): the shared tensors are the same `nn.Parameter` objects, declared in `_tied_weights_keys` so that saving and
loading keep them so.

State that changes outside the optimizer:

- the momentum encoders follow the online ones by EMA, once per optimizer step: `_momentum_update()` is called by
  `training.MomentumUpdateCallback` under `Trainer` (or by a hand-written loop after `optimizer.step()`), not by
  `forward`, so gradient accumulation does not multiply it;
- the queues are written by `forward` in training mode, with this step's momentum features of every rank;
- the distillation weight alpha ramps up over `config.alpha_warmup_steps` optimizer steps, read from
  `optimizer_steps`, which the callback sets from the Trainer's global step (so it survives a resume).

Queues and pointer are persistent buffers, so every checkpoint (and `save_pretrained`) carries them with the momentum
weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_blip import BlipConfig
from .losses import (
    NEGATIVE_SAMPLING_FLOOR,
    diagonal_positives,
    gather_batch_sizes,
    gather_texts,
    gather_with_grad,
    gather_without_grad,
    itc_loss,
    itm_labels,
    pad_texts,
    rank_and_world_size,
    same_id_positives,
    sample_hard_negatives,
    similarity_logits,
)
from .modeling_blip import (
    BlipPreTrainedModel,
    ItcFeaturesMixin,
    check_batch_sizes,
    image_grounded_encoding,
    itc_feature,
    replace_first_token,
)
from .modeling_med import BlipTextLMHeadModel, BlipTextModel, mask_padding
from .modeling_vision import BlipVisionModel

# Submodules of the image-grounded decoder that are the text encoder's own: everything but self-attention.
_SHARED_WITH_DECODER = r"(embeddings|encoder\.layer\.\d+\.(crossattention|intermediate|output))\."


def momentum_name(online_name: str) -> str:
    """The name of an online module's momentum copy: `_m` appended, in our layout and in the original's alike."""
    return online_name + "_m"


# (online module, momentum copy) attribute names.
MOMENTUM_PAIRS = tuple(
    (online_name, momentum_name(online_name))
    for online_name in ("vision_model", "vision_proj", "text_encoder", "text_proj")
)
# The ITC training state kept in buffers (names shared with the original checkpoints), and what each one holds.
QUEUE_BUFFERS = {
    "image_queue": "an ITC feature queue (training state)",
    "text_queue": "an ITC feature queue (training state)",
    "idx_queue": "the image-id queue of retrieval training (training state)",
    "queue_ptr": "the queue write pointer (training state)",
}

# Id written to the id queue for samples without an image id: it never equals a real (non-negative) id.
NO_IMAGE_ID = -100


@dataclass
class BlipForPreTrainingOutput(ModelOutput):
    """Output of [`BlipForPreTraining`] for a batch of B image-text pairs.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_itc + loss_itm + loss_lm`.
        loss_itc (`torch.FloatTensor` of shape `()`): image-text contrastive loss with momentum distillation.
        loss_itm (`torch.FloatTensor` of shape `()`): image-text matching loss over B positives and 2B hard negatives.
        loss_lm (`torch.FloatTensor` of shape `()`): label-smoothed captioning loss of the image-grounded decoder.
        itc_logits_per_image (`torch.FloatTensor` of shape `(B, K)`): each image against the K text keys (this
            step's momentum features, then the queue), divided by the temperature.
        itc_logits_per_text (`torch.FloatTensor` of shape `(B, K)`): each text against the K image keys.
        itm_logits (`torch.FloatTensor` of shape `(3B, 2)`): ITM head logits (not matched, matched) of the pairs
            (text i, image i), then (text i, its negative image), then (its negative text, image i).
        lm_logits (`torch.FloatTensor` of shape `(B, L, V)`): next-token logits of the decoder.
        itm_negative_image_indices (`torch.LongTensor` of shape `(B,)`): for each text, the index of its negative image
            in the candidate pool (the local batch, or the concatenated batches of all ranks with `negative_all_rank`).
        itm_negative_text_indices (`torch.LongTensor` of shape `(B,)`): for each image, its negative text's index.
        alpha (`float`): the distillation weight used.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_lm: torch.FloatTensor | None = None
    itc_logits_per_image: torch.FloatTensor | None = None
    itc_logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    lm_logits: torch.FloatTensor | None = None
    itm_negative_image_indices: torch.LongTensor | None = None
    itm_negative_text_indices: torch.LongTensor | None = None
    alpha: float | None = None


@dataclass
class _PairFeatures:
    """Momentum features of a set of image-text pairs (this rank's batch, or all ranks' in rank order), their image
    ids, and the row where this rank's batch starts in them."""

    image_feat: torch.Tensor  # (P, E)
    text_feat: torch.Tensor  # (P, E)
    image_ids: torch.Tensor | None  # (P,)
    offset: int

    @property
    def batch_size(self) -> int:
        return self.image_feat.shape[0]

    def ids_or_placeholder(self) -> torch.Tensor:
        if self.image_ids is not None:
            return self.image_ids
        return torch.full((self.batch_size,), NO_IMAGE_ID, dtype=torch.long, device=self.image_feat.device)


@dataclass
class ContrastiveMatchingResult:
    """What `BlipContrastiveMatchingModel.contrastive_and_matching` computes for a batch of B pairs; the fields of
    `BlipForPreTrainingOutput` of the same names say what each holds."""

    image_embeds: torch.Tensor  # (B, 1+N, Dv), the ViT's output, for the losses a subclass adds
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    itc_logits_per_image: torch.Tensor
    itc_logits_per_text: torch.Tensor
    itm_logits: torch.Tensor
    itm_negative_image_indices: torch.Tensor
    itm_negative_text_indices: torch.Tensor
    alpha: float


class BlipContrastiveMatchingModel(ItcFeaturesMixin, BlipPreTrainedModel):
    """The ViT, the MED text encoder, ITC projections and ITM head, their momentum copies and the queues: ITC with
    momentum distillation and ITM with hard negatives, the training shared by pretraining and retrieval.

    The config fields `queue_size`, `momentum`, `alpha`, `alpha_warmup_steps`, `negative_all_rank`, `itc_global_keys`
    and `itc_temperature*` drive it. Under `torch.distributed` ranks may hold batches of different sizes, with texts
    padded to different lengths; without a process group nothing distributed is called. Subclasses choose how hard
    negatives are drawn (`negative_candidate_features`, `negative_sampling_floor`), may build modules of their own
    (`_build_task_modules`) and write `forward` around `contrastive_and_matching`.
    """

    # The loss is a per-batch mean: Trainer must not rescale it by token counts or by the world size.
    accepts_loss_kwargs = False
    # Momentum weights and queues a checkpoint lacks are rebuilt from the online model, as the original does.
    _keys_to_ignore_on_load_missing = [rf"^{momentum}\." for _, momentum in MOMENTUM_PAIRS] + [
        rf"^{name}$" for name in QUEUE_BUFFERS
    ]
    # The features of the ITM candidates that each query's similarity is measured against to draw its negative:
    # "momentum" (the original pretraining: this step's momentum features) or "online" (the original retrieval: the
    # online features, gathered from every rank when negatives come from all ranks).
    negative_candidate_features = "momentum"
    # Added to the negatives' sampling weights before positives are zeroed (`sample_hard_negatives`).
    negative_sampling_floor = NEGATIVE_SAMPLING_FLOOR

    def __init__(self, config: BlipConfig):
        if self.negative_candidate_features not in ("momentum", "online"):
            raise ValueError(
                f"negative_candidate_features is 'momentum' or 'online', not {self.negative_candidate_features!r}"
            )
        super().__init__(config)
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config)
        self._build_task_modules(config)
        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(text_width, config.embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        self.temp = nn.Parameter(torch.tensor(config.itc_temperature))

        # Momentum copies. The ViT shares the online one's config, so its stochastic depth is the online one's, as
        # the original builds both (its ViT-L gets 0.1 in either role); the text encoder only runs unimodally, so it
        # needs no cross-attention.
        momentum_text_config = copy.deepcopy(config.text_config)
        momentum_text_config.add_cross_attention = False
        self.vision_model_m = BlipVisionModel(config.vision_config)
        self.text_encoder_m = BlipTextModel(momentum_text_config)
        self.vision_proj_m = nn.Linear(vision_width, config.embed_dim)
        self.text_proj_m = nn.Linear(text_width, config.embed_dim)

        # Queues of momentum features, one column per sample as in the original layout: (embed_dim, queue_size).
        self.register_buffer("image_queue", torch.zeros(config.embed_dim, config.queue_size))
        self.register_buffer("text_queue", torch.zeros(config.embed_dim, config.queue_size))
        self.register_buffer("idx_queue", torch.full((1, config.queue_size), NO_IMAGE_ID, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

        # Optimizer steps taken so far; drives the alpha ramp. `MomentumUpdateCallback` keeps it equal to the
        # Trainer's global step.
        self.optimizer_steps = 0
        self.post_init()

    def _build_task_modules(self, config: BlipConfig) -> None:
        """Builds a subclass's own modules. It runs between the text encoder and the projections, so that the
        construction order, and with it which random draws initialise which tensor, stays what it always was."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    # ---- Weights -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            # Runs after every submodule is initialised or loaded: fill only what is still missing.
            for queue in (self.image_queue, self.text_queue):
                if not getattr(queue, "_is_hf_initialized", False):
                    queue.copy_(F.normalize(torch.randn_like(queue), dim=0))
            init.constant_(self.idx_queue, NO_IMAGE_ID)
            init.zeros_(self.queue_ptr)
            momentum_params, online_params = self._momentum_parameter_pairs()
            for param_m, param in zip(momentum_params, online_params):
                init.copy_(param_m, param)  # only where the checkpoint had no momentum weights
            self._freeze_momentum_encoders()

    def _momentum_parameter_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(momentum parameters, the online parameters they follow), matched by name."""
        momentum_params, online_params = [], []
        for online_name, momentum_name in MOMENTUM_PAIRS:
            online = getattr(self, online_name)
            for name, param_m in getattr(self, momentum_name).named_parameters():
                momentum_params.append(param_m)
                online_params.append(online.get_parameter(name))
        return momentum_params, online_params

    @torch.no_grad()
    def restart_momentum_encoders(self) -> None:
        """Sets every momentum parameter to its online parameter's value, as the original's `copy_params` starts
        them: for online weights put in after loading (`load_state_dict` of another head's weights)."""
        momentum_params, online_params = self._momentum_parameter_pairs()
        torch._foreach_copy_(momentum_params, online_params)

    def _freeze_momentum_encoders(self) -> None:
        """The momentum encoders learn only by EMA, never from gradients."""
        for _, momentum_name in MOMENTUM_PAIRS:
            getattr(self, momentum_name).requires_grad_(False)

    @torch.no_grad()
    def _momentum_update(self) -> None:
        """One EMA step of the momentum encoders: param_m <- momentum * param_m + (1 - momentum) * param."""
        momentum_params, online_params = self._momentum_parameter_pairs()
        torch._foreach_mul_(momentum_params, self.config.momentum)
        torch._foreach_add_(momentum_params, online_params, alpha=1.0 - self.config.momentum)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Loading replaces parameters by new ones that require grad; the momentum encoders must stay frozen.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._freeze_momentum_encoders()
        return loaded

    # ---- Queues and alpha ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, image_ids: torch.Tensor):
        """Writes the momentum features (N, E) and image ids (N,) of every rank at the pointer, wrapping around."""
        queue_size = self.config.queue_size
        if queue_size == 0:
            return
        if image_feat_m.shape[0] > queue_size:  # a global batch larger than the queue keeps its newest samples
            image_feat_m, text_feat_m, image_ids = (t[-queue_size:] for t in (image_feat_m, text_feat_m, image_ids))
        num_new = image_feat_m.shape[0]
        ptr = int(self.queue_ptr)
        columns = (ptr + torch.arange(num_new, device=self.queue_ptr.device)) % queue_size
        self.image_queue[:, columns] = image_feat_m.t().to(self.image_queue.dtype)
        self.text_queue[:, columns] = text_feat_m.t().to(self.text_queue.dtype)
        self.idx_queue[0, columns] = image_ids
        self.queue_ptr[0] = (ptr + num_new) % queue_size

    def distillation_alpha(self, step: int | None = None) -> float:
        """Weight of the momentum targets after `step` optimizer steps: `alpha`, ramped linearly from 0 when
        `alpha_warmup_steps > 0` (the original ramps over its first two epochs of pretraining, over the first epoch of
        retrieval fine-tuning)."""
        step = self.optimizer_steps if step is None else step
        warmup = self.config.alpha_warmup_steps
        if warmup <= 0:
            return self.config.alpha
        return self.config.alpha * min(1.0, step / warmup)

    # ---- Forward -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _momentum_features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ITC features (B, E) of the images and texts through the momentum encoders."""
        image_embeds_m = self.vision_model_m(pixel_values).last_hidden_state
        text_embeds_m = self.text_encoder_m(input_ids, attention_mask=attention_mask, mode="text").last_hidden_state
        return itc_feature(self.vision_proj_m, image_embeds_m), itc_feature(self.text_proj_m, text_embeds_m)

    def _itc(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        query: _PairFeatures,
        keys: _PairFeatures,
        temperature: torch.Tensor,
        alpha: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC of this rank's pairs against `keys` (this step's momentum features) followed by the queue."""
        image_keys = torch.cat([keys.image_feat, self.image_queue.t()])  # (K, E); cat copies the queue
        text_keys = torch.cat([keys.text_feat, self.text_queue.t()])  # (K, E)
        if query.image_ids is None:
            positives = diagonal_positives(query.batch_size, image_keys.shape[0], keys.offset, image_keys.device)
        else:
            positives = same_id_positives(query.image_ids, torch.cat([keys.image_ids, self.idx_queue[0]]))
        return itc_loss(
            image_feat,
            text_feat,
            query.image_feat,
            query.text_feat,
            image_keys,
            text_keys,
            positives,
            temperature,
            alpha,
        )

    def _itm(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        query: _PairFeatures,
        pool: _PairFeatures,
        temperature: torch.Tensor,
        pool_from_all_ranks: bool,
        batch_sizes: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITM over (text, image) positives and hard negatives drawn from `pool` (this rank's batch or all ranks',
        with the features `negative_candidate_features` names).

        Returns the loss, the logits (3B, 2) and the pool indices of the negative images and texts.
        """
        batch_size = query.batch_size
        if not pool_from_all_ranks:
            pool_image_embeds, pool_input_ids, pool_attention_mask = image_embeds, input_ids, attention_mask
        else:
            # (P, 1+N, Dv), P the global batch; the gradient of every rank's use returns to the image's own rank.
            pool_image_embeds = gather_with_grad(image_embeds, batch_sizes)
            # (P, L_max): ranks may pad their texts to different lengths; the local ones are padded alike.
            pad_token_id = self.config.text_config.pad_token_id
            pool_input_ids, pool_attention_mask = gather_texts(input_ids, attention_mask, batch_sizes, pad_token_id)
            input_ids, attention_mask = pad_texts(input_ids, attention_mask, pool_input_ids.shape[1], pad_token_id)
        with torch.no_grad():
            if query.image_ids is None:
                positives = diagonal_positives(batch_size, pool.batch_size, pool.offset, image_feat.device)
            else:
                positives = same_id_positives(query.image_ids, pool.image_ids)  # (B, P)
            # Similarity of the online queries with the candidates' features (`negative_candidate_features`).
            i2t = similarity_logits(image_feat, pool.text_feat, temperature)  # (B, P), fp32
            t2i = similarity_logits(text_feat, pool.image_feat, temperature)  # (B, P), fp32
            negative_text_indices = sample_hard_negatives(i2t, positives, floor=self.negative_sampling_floor)
            negative_image_indices = sample_hard_negatives(t2i, positives, floor=self.negative_sampling_floor)

        # Pairs: (text i, image i), (text i, negative image), (negative text, image i).
        itm_input_ids = torch.cat([input_ids, input_ids, pool_input_ids[negative_text_indices]])  # (3B, L)
        itm_attention_mask = torch.cat([attention_mask, attention_mask, pool_attention_mask[negative_text_indices]])
        itm_image_embeds = torch.cat([image_embeds, pool_image_embeds[negative_image_indices], image_embeds])
        multimodal_embeds = image_grounded_encoding(
            self.text_encoder, itm_input_ids, itm_attention_mask, encoder_hidden_states=itm_image_embeds
        ).last_hidden_state  # (3B, L, D)
        itm_logits = self.itm_head(multimodal_embeds[:, 0])  # (3B, 2)
        loss = F.cross_entropy(itm_logits.float(), itm_labels(batch_size, itm_logits.device))
        return loss, itm_logits, negative_image_indices, negative_text_indices

    def contrastive_and_matching(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        alpha: float | None = None,
    ) -> ContrastiveMatchingResult:
        """ITC and ITM of a batch; in training mode the queues take this step's momentum features of every rank.
        The arguments are those of `BlipForPreTraining.forward`, `attention_mask` required."""
        check_batch_sizes(pixel_values, input_ids)
        alpha = self.distillation_alpha() if alpha is None else alpha
        temperature = self.clamped_temperature()
        rank, world_size = rank_and_world_size()
        batch_sizes = gather_batch_sizes(input_ids.shape[0], input_ids.device)  # every rank's, in rank order

        image_embeds = self.vision_model(pixel_values).last_hidden_state  # (B, 1+N, Dv)
        image_feat = itc_feature(self.vision_proj, image_embeds)  # (B, E)
        text_embeds = self.text_encoder(input_ids, attention_mask=attention_mask, mode="text").last_hidden_state
        text_feat = itc_feature(self.text_proj, text_embeds)  # (B, E)

        # Momentum features of this rank's pairs and of every rank's (exchanged without gradient, in rank order).
        image_feat_m, text_feat_m = self._momentum_features(pixel_values, input_ids, attention_mask)
        local = _PairFeatures(image_feat_m, text_feat_m, image_ids, offset=0)
        everyone = _PairFeatures(
            gather_without_grad(image_feat_m, batch_sizes),
            gather_without_grad(text_feat_m, batch_sizes),
            gather_without_grad(image_ids, batch_sizes) if image_ids is not None else None,
            offset=sum(batch_sizes[:rank]),
        )

        itc_keys = everyone if self.config.itc_global_keys else local
        loss_itc, itc_logits_per_image, itc_logits_per_text = self._itc(
            image_feat, text_feat, local, itc_keys, temperature, alpha
        )
        if self.training:
            self._dequeue_and_enqueue(everyone.image_feat, everyone.text_feat, everyone.ids_or_placeholder())

        negatives_from_all_ranks = self.config.negative_all_rank and world_size > 1
        pool = everyone if negatives_from_all_ranks else local
        if self.negative_candidate_features == "online":
            online_image_feat, online_text_feat = image_feat.detach(), text_feat.detach()
            if negatives_from_all_ranks:
                online_image_feat = gather_without_grad(online_image_feat, batch_sizes)
                online_text_feat = gather_without_grad(online_text_feat, batch_sizes)
            pool = _PairFeatures(online_image_feat, online_text_feat, pool.image_ids, pool.offset)
        loss_itm, itm_logits, negative_image_indices, negative_text_indices = self._itm(
            image_embeds,
            input_ids,
            attention_mask,
            image_feat,
            text_feat,
            query=local,
            pool=pool,
            temperature=temperature,
            pool_from_all_ranks=negatives_from_all_ranks,
            batch_sizes=batch_sizes,
        )
        return ContrastiveMatchingResult(
            image_embeds=image_embeds,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            itc_logits_per_image=itc_logits_per_image,
            itc_logits_per_text=itc_logits_per_text,
            itm_logits=itm_logits,
            itm_negative_image_indices=negative_image_indices,
            itm_negative_text_indices=negative_text_indices,
            alpha=alpha,
        )


class BlipForPreTraining(BlipContrastiveMatchingModel):
    """BLIP's pretraining model: ITC (momentum distillation, queues), ITM (hard negatives) and LM in one forward.

    On top of `BlipContrastiveMatchingModel` it has the image-grounded decoder, which shares every parameter but its
    self-attention with the text encoder. Hard negatives are drawn as the original pretraining draws them: by the
    similarity of the online queries with the candidates' momentum features, with a small floor on every weight.
    """

    _tied_weights_keys = {rf"text_decoder\.bert\.{_SHARED_WITH_DECODER}": rf"text_encoder\.{_SHARED_WITH_DECODER}"}

    def __init__(self, config: BlipConfig):
        if not config.tie_word_embeddings:
            raise ValueError(
                "BlipForPreTraining shares weights between its encoder and decoder: keep tie_word_embeddings"
            )
        super().__init__(config)

    def _build_task_modules(self, config: BlipConfig) -> None:
        self.text_decoder = BlipTextLMHeadModel(config.text_config)

    def _lm(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-smoothed captioning loss of the decoder, `[DEC]` first, pads ignored; and its logits (B, L, V)."""
        text_config = self.config.text_config
        decoder_input_ids = replace_first_token(input_ids, text_config.decoder_bos_token_id)
        targets = mask_padding(decoder_input_ids, text_config.pad_token_id)
        output = self.text_decoder(
            decoder_input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds, labels=targets
        )
        return output.loss, output.logits

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        alpha: float | None = None,
        return_dict: bool = True,
    ) -> BlipForPreTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): the images.
            input_ids (`torch.LongTensor` of shape `(B, L)`): tokenized captions, `[CLS] ... [SEP]` and padding; the
                model puts `[ENC]` and `[DEC]` first where needed. Pad to a fixed length when training on several
                ranks.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real tokens.
            image_ids (`torch.LongTensor` of shape `(B,)`, *optional*): non-negative ids of the images. Given, every
                pair that shares an image id (in the batch, on any rank, or in the queue) is a positive in ITC and
                never an ITM negative: the retrieval recipe. Without them each pair is its own only positive.
            alpha (`float`, *optional*): distillation weight; defaults to `distillation_alpha()`.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        result = self.contrastive_and_matching(pixel_values, input_ids, attention_mask, image_ids, alpha)
        loss_lm, lm_logits = self._lm(result.image_embeds, input_ids, attention_mask)

        output = BlipForPreTrainingOutput(
            loss=result.loss_itc + result.loss_itm + loss_lm,
            loss_itc=result.loss_itc,
            loss_itm=result.loss_itm,
            loss_lm=loss_lm,
            itc_logits_per_image=result.itc_logits_per_image,
            itc_logits_per_text=result.itc_logits_per_text,
            itm_logits=result.itm_logits,
            lm_logits=lm_logits,
            itm_negative_image_indices=result.itm_negative_image_indices,
            itm_negative_text_indices=result.itm_negative_text_indices,
            alpha=result.alpha,
        )
        return output if return_dict else output.to_tuple()


def count_unique_parameters(model: nn.Module, include_momentum: bool = False) -> int:
    """Parameters of `model`, each shared tensor counted once; the momentum copies only if `include_momentum`."""
    momentum_prefixes = tuple(f"{name}." for _, name in MOMENTUM_PAIRS)
    total = 0
    for name, param in model.named_parameters():  # named_parameters() yields a shared parameter once
        if include_momentum or not name.startswith(momentum_prefixes):
            total += param.numel()
    return total


__all__ = [
    "MOMENTUM_PAIRS",
    "QUEUE_BUFFERS",
    "BlipContrastiveMatchingModel",
    "BlipForPreTraining",
    "BlipForPreTrainingOutput",
    "ContrastiveMatchingResult",
    "count_unique_parameters",
    "momentum_name",
]
