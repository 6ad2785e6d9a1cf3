"""Two-process checks of the retrieval training model, launched by tests/test_finetune_retrieval.py:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist_retrieval_training.py OUTPUT_DIR

With `negative_all_rank` each rank draws its ITM negatives from the batches of both ranks, weighted by the online
features' similarity; each rank saves what its sampler was given to OUTPUT_DIR/rank{r}.pt, and the test compares that
with one process on the whole batch. The helpers below build the same model and batch in both places.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import make_config  # noqa: E402

import transformers_blip.modeling_pretraining as modeling_pretraining  # noqa: E402
from transformers_blip import BlipForImageTextRetrieval, BlipForRetrievalTraining  # noqa: E402
from transformers_blip.losses import NEGATIVE_SAMPLING_FLOOR, sample_hard_negatives  # noqa: E402

QUEUE_SIZE = 8
BATCH_IDS = [7, 7, 3, 5, 9]  # two captions of image 7
QUEUE_IDS = [3, -100, 7, 11, 12, 13, -100, 14]  # images 3 and 7 also have queued captions
RANK_SIZES = (3, 2)  # rank 0 holds both captions of image 7


def make_training_model(**overrides) -> BlipForRetrievalTraining:
    """A tiny training model from a random retrieval head, with a filled queue and nudged momentum encoders (so that
    momentum and online features differ, as they do after a few steps)."""
    torch.manual_seed(0)
    head = BlipForImageTextRetrieval(make_config(queue_size=QUEUE_SIZE, **overrides))
    model = BlipForRetrievalTraining.from_retrieval_model(head)
    with torch.no_grad():
        model.image_queue.copy_(F.normalize(torch.randn_like(model.image_queue), dim=0))
        model.text_queue.copy_(F.normalize(torch.randn_like(model.text_queue), dim=0))
        model.idx_queue.copy_(torch.tensor([QUEUE_IDS]))
        for param in model.text_encoder_m.parameters():
            param.add_(0.02 * torch.randn_like(param))
        for param in model.vision_model_m.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.train()


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch_size, length = len(BATCH_IDS), 9
    input_ids = torch.randint(104, 126, (batch_size, length), generator=generator)
    input_ids[:, 0] = 101
    lengths = torch.tensor([9, 5, 7, 4, 6])
    attention_mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    input_ids[torch.arange(batch_size), lengths - 1] = 102
    return {
        "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator),
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
        "image_ids": torch.tensor(BATCH_IDS),
    }


def recording_sampler(drawn: list):
    """`sample_hard_negatives`, recording in `drawn` the (logits, positives, floor) of every call."""

    def sample(logits, positives, generator=None, floor=NEGATIVE_SAMPLING_FLOOR):
        drawn.append((logits.clone(), positives.clone(), floor))
        return sample_hard_negatives(logits, positives, generator, floor)

    return sample


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_training_model(negative_all_rank=True)
    start = sum(RANK_SIZES[:rank])
    batch = {name: value[start : start + RANK_SIZES[rank]] for name, value in make_batch().items()}
    drawn = []
    modeling_pretraining.sample_hard_negatives = recording_sampler(drawn)
    output = model(**batch)
    output.loss.backward()
    results = {
        "drawn": drawn,
        "negative_image_indices": output.itm_negative_image_indices,
        "negative_text_indices": output.itm_negative_text_indices,
    }
    torch.save(results, os.path.join(output_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
