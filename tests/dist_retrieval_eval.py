"""Two-process retrieval scores, launched by tests/test_retrieval_eval.py:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 tests/dist_retrieval_eval.py OUTPUT_DIR

Each rank scores its share of the images and saves the full matrices it returns to OUTPUT_DIR/rank{r}.pt; the test
compares them with one process. The helpers below build the same model and data in both places.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS), str(TESTS.parent / "benchmarks")]
from bench_retrieval_eval import make_data  # noqa: E402
from conftest import make_config  # noqa: E402

from transformers_blip import BlipForImageTextRetrieval  # noqa: E402
from transformers_blip.evaluation import retrieval_scores  # noqa: E402

NUM_IMAGES = 7  # odd: the ranks' shares differ
NUM_TEXTS = 19
K_TEST = 5


def make_model() -> BlipForImageTextRetrieval:
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(make_config()).eval()


def make_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (I, 3, 32, 32), text ids and masks (T, 35) of texts of different lengths."""
    return make_data(NUM_IMAGES, NUM_TEXTS)


def main(output_dir: str) -> None:
    dist.init_process_group("gloo")
    scores = retrieval_scores(make_model(), *make_inputs(), k_test=K_TEST, max_pairs_per_forward=8)
    torch.save(scores, os.path.join(output_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
