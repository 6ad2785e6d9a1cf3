"""Two-process checks of the pretraining model, launched by tests/test_pretraining_distributed.py:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist_pretraining.py OUTPUT_DIR

Each rank runs every scenario on its half of a global batch and saves what it saw to OUTPUT_DIR/rank{r}.pt; the test
compares that with one process on the whole batch. The helpers below build the same model and batch in both places.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_config  # noqa: E402

from transformers_blip.modeling_pretraining import BlipForPreTraining  # noqa: E402

GLOBAL_BATCH = 4
TEXT_LENGTH = 8


def make_model(**config_overrides) -> BlipForPreTraining:
    """The same tiny model in every process; the momentum encoders are nudged away from the online ones so that
    the distillation targets differ from the online similarities."""
    torch.manual_seed(0)
    model = BlipForPreTraining(make_config(**config_overrides))
    with torch.no_grad():
        for param in model.text_encoder.parameters():
            param.add_(0.01 * torch.randn_like(param))
    return model.train()


def make_batch(seed: int = 0, image_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A global batch of GLOBAL_BATCH pairs with texts of different lengths, padded to TEXT_LENGTH."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    input_ids = torch.randint(104, 126, (GLOBAL_BATCH, TEXT_LENGTH), generator=generator)
    input_ids[:, 0] = 101
    lengths = torch.tensor([8, 5, 7, 4])
    attention_mask = (torch.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).long()
    input_ids[torch.arange(GLOBAL_BATCH), lengths - 1] = 102
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    batch = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    if image_ids is not None:
        batch["image_ids"] = torch.tensor(image_ids)
    return batch


def rank_slice(
    batch: dict[str, torch.Tensor], rank: int, world_size: int, sizes: tuple[int, ...] | None = None
) -> dict[str, torch.Tensor]:
    """This rank's part of the global batch: equal parts, or `sizes[rank]` rows after the lower ranks' rows."""
    sizes = sizes if sizes is not None else (GLOBAL_BATCH // world_size,) * world_size
    start = sum(sizes[:rank])
    return {name: value[start : start + sizes[rank]] for name, value in batch.items()}


def trainable_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def global_keys_scenario(rank: int, world_size: int) -> dict:
    """ITC with this step's keys of all ranks and an empty queue; DDP averages the gradients."""
    model = make_model(itc_global_keys=True, queue_size=0)
    ddp_model = DistributedDataParallel(model)
    output = ddp_model(**rank_slice(make_batch(), rank, world_size))
    # Zero weight on the other losses, so that every parameter gets a gradient and DDP reduces them all.
    (output.loss_itc + 0.0 * (output.loss_itm + output.loss_lm)).backward()
    return {"loss_itc": output.loss_itc.detach(), "grads": trainable_gradients(model)}


def queue_scenario(rank: int, world_size: int) -> dict:
    """The default: local ITC keys, and the queue filled with the momentum features of every rank."""
    model = make_model(queue_size=16)
    model(**rank_slice(make_batch(image_ids=[3, 5, 7, 9]), rank, world_size))
    return {name: getattr(model, name).clone() for name in ("image_queue", "text_queue", "idx_queue", "queue_ptr")}


def uneven_scenario(rank: int, world_size: int) -> dict:
    """Rank 0 holds three pairs, rank 1 one (as after a skipped sample) whose text is padded to 5 tokens, not 8 (as
    with `padding="longest"`): queues and all-rank negatives still work."""
    model = make_model(queue_size=16, negative_all_rank=True)
    batch = rank_slice(make_batch(image_ids=[3, 5, 7, 9]), rank, world_size, sizes=(3, 1))
    if rank == 1:
        batch["input_ids"], batch["attention_mask"] = batch["input_ids"][:, :5], batch["attention_mask"][:, :5]
    output = model(**batch)
    output.loss.backward()
    return {
        "image_queue": model.image_queue.clone(),
        "queue_ptr": model.queue_ptr.clone(),
        "negative_image_indices": output.itm_negative_image_indices,
    }


def negatives_scenario(rank: int, world_size: int, negative_all_rank: bool) -> dict:
    """Rank 0's two pairs share an image id, so it has no negative of its own; rank 1's pairs are distinct.

    Rank 0 backpropagates its ITM loss and rank 1 nothing (0 x its loss): rank 1's ViT then gets a gradient only if
    rank 0's negative images came from rank 1, through the gather that keeps the gradient.
    """
    model = make_model(queue_size=0, negative_all_rank=negative_all_rank)
    output = model(**rank_slice(make_batch(image_ids=[1, 1, 2, 3]), rank, world_size))
    (output.loss_itm * (1.0 if rank == 0 else 0.0)).backward()
    vision_grad = sum(param.grad.abs().sum() for param in model.vision_model.parameters() if param.grad is not None)
    return {
        "negative_image_indices": output.itm_negative_image_indices,
        "negative_text_indices": output.itm_negative_text_indices,
        "vision_grad_norm": torch.as_tensor(vision_grad),
    }


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {
        "global_keys": global_keys_scenario(rank, world_size),
        "queue": queue_scenario(rank, world_size),
        "uneven_queue": uneven_scenario(rank, world_size),
        "negatives_all_rank": negatives_scenario(rank, world_size, negative_all_rank=True),
        "negatives_local": negatives_scenario(rank, world_size, negative_all_rank=False),
    }
    torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
