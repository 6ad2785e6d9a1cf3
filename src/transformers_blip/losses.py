"""BLIP's training losses as pure functions of features: ITC with momentum distillation, ITM hard negatives, gathers.

Nothing here holds state: the pretraining model owns the momentum encoders and the queues and passes their features
in. The cross-rank gathers are no-ops in a single process (no process group needed), so every function runs the same
way in a test, on one GPU and under DDP.

- Keys of the contrastive loss are momentum features, which carry no gradient, so ranks exchange them with a plain
  all-gather (`gather_without_grad`).
- ITM hard negatives drawn from all ranks need the other ranks' image embeddings *with* their gradient
  (`gather_with_grad`): the backward pass sums each rank's contribution into the rank that owns the sample, and DDP's
  averaging then gives the gradient of the mean loss over ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

# Added to the sampling weights of hard negatives before positives are zeroed, as the original pretraining does, so
# that every non-positive candidate keeps a chance even when the softmax underflows.
NEGATIVE_SAMPLING_FLOOR = 1e-4


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def gather_batch_sizes(batch_size: int, device: torch.device) -> list[int]:
    """Every rank's batch size, in rank order (`[batch_size]` in a single process).

    Ranks may hold batches of different sizes (a last partial batch, a sample skipped because its image would not
    decode); the gathers below take these sizes and pad and unpad around the collective.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return [batch_size]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([batch_size], dtype=torch.long, device=device))
    return [int(size) for size in sizes]


def _all_gather_padded(tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """all_gather along dim 0 of tensors whose dim 0 differs between ranks: (sum(sizes), ...)."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)], dim=0)


@torch.no_grad()
def gather_without_grad(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Concatenates `tensor` (B_r, ...) of every rank r along dim 0 in rank order, without gradient.

    `sizes` lists every rank's B_r (`gather_batch_sizes`); without it all ranks must pass the same shape. Without a
    process group (or with one process) it returns `tensor` itself.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    return _all_gather_padded(tensor, sizes if sizes is not None else [tensor.shape[0]] * world_size)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward gives each rank the sum over ranks of the gradients of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        rank, _ = rank_and_world_size()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return _all_gather_padded(tensor, sizes)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_output = grad_output.contiguous()
        dist.all_reduce(grad_output)  # every rank's loss may have used this rank's slice
        return grad_output[ctx.start : ctx.stop], None


def gather_with_grad(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Like `gather_without_grad`, but the result stays in the autograd graph.

    The backward pass sends every rank's gradient of a gathered slice back to the rank that produced it and sums them.
    """
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, sizes if sizes is not None else [tensor.shape[0]] * world_size)


def pad_texts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads token ids and their mask (B, L) to (B, length)."""
    extra = length - input_ids.shape[1]
    if extra == 0:
        return input_ids, attention_mask
    return F.pad(input_ids, (0, extra), value=pad_token_id), F.pad(attention_mask, (0, extra), value=0)


@torch.no_grad()
def gather_texts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, sizes: Sequence[int], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's token ids and masks, (sum(sizes), L_max), padded to the longest text length of any rank."""
    _, world_size = rank_and_world_size()
    if world_size == 1:
        return input_ids, attention_mask
    own_length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    longest = int(gather_without_grad(own_length).max())
    input_ids, attention_mask = pad_texts(input_ids, attention_mask, longest, pad_token_id)
    return gather_without_grad(input_ids, sizes), gather_without_grad(attention_mask, sizes)


def diagonal_positives(batch_size: int, num_keys: int, offset: int, device: torch.device) -> torch.Tensor:
    """Boolean (B, K) mask whose only positive for query i is key `offset + i` (its own pair)."""
    positives = torch.zeros(batch_size, num_keys, dtype=torch.bool, device=device)
    rows = torch.arange(batch_size, device=device)
    positives[rows, rows + offset] = True
    return positives


def same_id_positives(query_ids: torch.Tensor, key_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, K) mask of the keys whose image id equals the query's: every caption of an image is a positive."""
    return query_ids.view(-1, 1) == key_ids.view(1, -1)


def similarity_logits(queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """`queries @ keys.T / temperature`, (B, K), in fp32 whatever autocast is on.

    The features are normalised, so their similarities lie in [-1, 1], where bf16 keeps about two decimal digits:
    divided by a temperature near 0.07 that is an error of several tenths in a logit, which drowns what the
    contrastive losses learn from.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        return queries.float() @ keys.float().t() / torch.as_tensor(temperature, dtype=torch.float32)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross entropy against a target distribution per row: logits and targets (B, K); the mean over rows."""
    return -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    positives: torch.Tensor,
    temperature: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    Image-text contrastive loss with momentum distillation (ALBEF/BLIP).

    Each image query is scored against every text key and each text query against every image key. The targets mix
    the momentum model's own similarity distribution (weight `alpha`) with the ground truth (uniform over the
    positives, weight `1 - alpha`); the loss is the mean of the image-to-text and text-to-image soft cross entropies.

    Args:
        image_feat, text_feat (`torch.Tensor` of shape `(B, E)`): normalised features of the online model.
        image_feat_m, text_feat_m (`torch.Tensor` of shape `(B, E)`): the same pairs through the momentum model.
        image_keys, text_keys (`torch.Tensor` of shape `(K, E)`): momentum features to contrast with: this step's
            batch (the local one, or all ranks'), then the queue.
        positives (`torch.BoolTensor` of shape `(B, K)`): which keys are positives of each query; every row needs one.
        temperature (`torch.Tensor` of shape `()`): the learned temperature.
        alpha (`float`): weight of the momentum model's soft targets.

    Returns:
        `(loss, logits_per_image, logits_per_text)`, the logits each `(B, K)`; all in fp32, also under autocast.
    """
    with torch.no_grad():
        hard_targets = positives.float() / positives.sum(dim=1, keepdim=True)  # (B, K)
        soft_i2t = F.softmax(similarity_logits(image_feat_m, text_keys, temperature), dim=1)  # (B, K)
        soft_t2i = F.softmax(similarity_logits(text_feat_m, image_keys, temperature), dim=1)  # (B, K)
        targets_i2t = alpha * soft_i2t + (1 - alpha) * hard_targets
        targets_t2i = alpha * soft_t2i + (1 - alpha) * hard_targets
    logits_per_image = similarity_logits(image_feat, text_keys, temperature)  # (B, K), fp32
    logits_per_text = similarity_logits(text_feat, image_keys, temperature)  # (B, K), fp32
    with torch.autocast(device_type=logits_per_image.device.type, enabled=False):
        loss_i2t = soft_cross_entropy(logits_per_image, targets_i2t)
        loss_t2i = soft_cross_entropy(logits_per_text, targets_t2i)
    return (loss_i2t + loss_t2i) / 2, logits_per_image, logits_per_text


@torch.no_grad()
def sample_hard_negatives(
    logits: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
    floor: float = NEGATIVE_SAMPLING_FLOOR,
) -> torch.Tensor:
    r"""
    Draws one negative candidate per query, with probability proportional to the softmax of its similarity: the
    negatives most easily confused with the positive are the likeliest.

    Args:
        logits (`torch.Tensor` of shape `(B, P)`): similarity of each query with each candidate of the pool.
        positives (`torch.BoolTensor` of shape `(B, P)`): candidates that must not be drawn (the pair itself, or every
            caption of the same image).
        generator (`torch.Generator`, *optional*): source of randomness (default: torch's global one).
        floor (`float`): added to every softmax weight before the positives are zeroed: the original pretraining's
            `NEGATIVE_SAMPLING_FLOOR`; 0 for the original retrieval fine-tuning, whose weights are the softmax alone.

    Returns:
        `torch.LongTensor` of shape `(B,)`: the index of each query's negative in the pool. A query whose weights are
        all zero is drawn uniformly among its non-positive candidates (without a floor the softmax may underflow),
        and one whose every candidate is a positive (a degenerate batch) among all of them, a false negative then.
    """
    weights = F.softmax(logits.float(), dim=1) + floor  # (B, P)
    weights = weights.masked_fill(positives, 0.0)
    no_weight = weights.sum(dim=1) == 0
    if bool(no_weight.any()):
        non_positives = (~positives[no_weight]).float()
        no_negative = non_positives.sum(dim=1, keepdim=True) == 0
        weights[no_weight] = torch.where(no_negative, torch.ones_like(non_positives), non_positives)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_labels(batch_size: int, device: torch.device) -> torch.Tensor:
    """ITM targets in the order the pretraining model scores its pairs: B positives, then 2B negatives."""
    return torch.cat(
        [
            torch.ones(batch_size, dtype=torch.long, device=device),
            torch.zeros(2 * batch_size, dtype=torch.long, device=device),
        ]
    )


__all__ = [
    "NEGATIVE_SAMPLING_FLOOR",
    "diagonal_positives",
    "gather_batch_sizes",
    "gather_texts",
    "gather_with_grad",
    "gather_without_grad",
    "itc_loss",
    "itm_labels",
    "pad_texts",
    "rank_and_world_size",
    "same_id_positives",
    "sample_hard_negatives",
    "similarity_logits",
    "soft_cross_entropy",
]
