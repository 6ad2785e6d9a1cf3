"""Retrieval fine-tuning as the original's `blip_retrieval.py` trains: ITC with momentum encoders and feature queues,
where every pair that shares an image id is a positive, and ITM with hard negatives; no LM loss.

`BlipForRetrievalTraining` is `BlipContrastiveMatchingModel` (modeling_pretraining.py: the encoders, their momentum
copies, the queues with their image-id queue, ITC, ITM) with the original retrieval's two differences from pretraining:

- ITM negatives are drawn by the similarity of the online queries with the candidates' *online* features (gathered
  from every rank with `negative_all_rank`), where pretraining uses the candidates' momentum features;
- their sampling weights are the softmax alone, every same-id pair set to 0, without pretraining's floor.

Image ids are required. The alpha ramp is `config.alpha_warmup_steps`: the original ramps alpha over the first
epoch, so a fine-tuning run sets it to the optimizer steps of one epoch. It is a training model: it starts from a
[`BlipForImageTextRetrieval`] (`from_retrieval_model`, momentum copies equal to the online encoders) and ends as
one (`to_retrieval_model`, without momentum weights or queues). A Trainer checkpoint of it holds the momentum weights
and queues too, so a resume continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .configuration_blip import BlipConfig
from .modeling_blip import BlipForImageTextRetrieval
from .modeling_pretraining import MOMENTUM_PAIRS, QUEUE_BUFFERS, BlipContrastiveMatchingModel

_TRAINING_STATE_PREFIXES = tuple(f"{momentum}." for _, momentum in MOMENTUM_PAIRS)


def is_training_state(name: str) -> bool:
    """Whether a state-dict key is a momentum weight or a queue, which the retrieval head does not have."""
    return name in QUEUE_BUFFERS or name.startswith(_TRAINING_STATE_PREFIXES)


@dataclass
class BlipForRetrievalTrainingOutput(ModelOutput):
    """Output of [`BlipForRetrievalTraining`] for a batch of B image-text pairs.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_itc + loss_itm`.
        loss_itc (`torch.FloatTensor` of shape `()`): image-text contrastive loss with momentum distillation, every
            key of the same image id a positive.
        loss_itm (`torch.FloatTensor` of shape `()`): image-text matching loss over B positives and 2B hard negatives.
        itc_logits_per_image (`torch.FloatTensor` of shape `(B, K)`): each image against the K text keys (this rank's
            momentum features, then the queue), divided by the temperature.
        itc_logits_per_text (`torch.FloatTensor` of shape `(B, K)`): each text against the K image keys.
        itm_logits (`torch.FloatTensor` of shape `(3B, 2)`): ITM head logits (not matched, matched) of the pairs
            (text i, image i), then (text i, its negative image), then (its negative text, image i).
        itm_negative_image_indices (`torch.LongTensor` of shape `(B,)`): for each text, the index of its negative image
            in the candidate pool (the local batch, or the concatenated batches of all ranks with `negative_all_rank`).
        itm_negative_text_indices (`torch.LongTensor` of shape `(B,)`): for each image, its negative text's index.
        alpha (`float`): the distillation weight used.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    itc_logits_per_image: torch.FloatTensor | None = None
    itc_logits_per_text: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itm_negative_image_indices: torch.LongTensor | None = None
    itm_negative_text_indices: torch.LongTensor | None = None
    alpha: float | None = None


class BlipForRetrievalTraining(BlipContrastiveMatchingModel):
    """BLIP's retrieval fine-tuning model (the original's `BLIP_Retrieval`): ITC + ITM, image ids as positives.

    Its online modules are those of [`BlipForImageTextRetrieval`] under the same names, so that the head's weights
    move in and out of it unchanged.
    """

    negative_candidate_features = "online"
    negative_sampling_floor = 0.0

    @classmethod
    def from_retrieval_model(
        cls, head: BlipForImageTextRetrieval, config: BlipConfig | None = None
    ) -> BlipForRetrievalTraining:
        """A training model with `head`'s weights and momentum encoders equal to them; fresh queues.

        Args:
            head: the retrieval head to fine-tune.
            config: the training model's config (queue size, momentum, alpha and its ramp, `negative_all_rank`);
                by default a copy of the head's. Its modules must be the head's.
        """
        config = config if config is not None else BlipConfig.from_dict(head.config.to_dict())
        model = cls(config)
        missing, unexpected = model.load_state_dict(head.state_dict(), strict=False)
        missing = [name for name in missing if not is_training_state(name)]
        if missing or unexpected:
            raise ValueError(
                f"the retrieval head does not match the training model's config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        model.restart_momentum_encoders()
        return model.train()

    def to_retrieval_model(self) -> BlipForImageTextRetrieval:
        """The [`BlipForImageTextRetrieval`] with this model's online weights (copies), in eval mode."""
        head = BlipForImageTextRetrieval(BlipConfig.from_dict(self.config.to_dict()))
        state_dict = {name: tensor for name, tensor in self.state_dict().items() if not is_training_state(name)}
        head.load_state_dict(state_dict, strict=True)
        return head.to(next(self.parameters()).device).eval()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        alpha: float | None = None,
        return_dict: bool = True,
    ) -> BlipForRetrievalTrainingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): the images.
            input_ids (`torch.LongTensor` of shape `(B, L)`): tokenized captions, `[CLS] ... [SEP]` and padding; the
                model puts `[ENC]` first for ITM.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real tokens.
            image_ids (`torch.LongTensor` of shape `(B,)`): non-negative ids of the images; every pair that shares an
                image id (in the batch, on any rank, or in the queue) is a positive, never an ITM negative.
            alpha (`float`, *optional*): distillation weight; defaults to `distillation_alpha()`.
        """
        if image_ids is None:
            raise ValueError("BlipForRetrievalTraining needs image_ids: the captions of one image are all positives")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        result = self.contrastive_and_matching(pixel_values, input_ids, attention_mask, image_ids, alpha)
        output = BlipForRetrievalTrainingOutput(
            loss=result.loss_itc + result.loss_itm,
            loss_itc=result.loss_itc,
            loss_itm=result.loss_itm,
            itc_logits_per_image=result.itc_logits_per_image,
            itc_logits_per_text=result.itc_logits_per_text,
            itm_logits=result.itm_logits,
            itm_negative_image_indices=result.itm_negative_image_indices,
            itm_negative_text_indices=result.itm_negative_text_indices,
            alpha=result.alpha,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["BlipForRetrievalTraining", "BlipForRetrievalTrainingOutput", "is_training_state"]
