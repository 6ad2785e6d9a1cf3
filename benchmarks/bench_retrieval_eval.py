"""Retrieval evaluation speed: `retrieval_scores` against the original's per-query loop, same model, same run.

The loop is BLIP's `evaluation` (train_retrieval.py): one ITM forward per image over its top-k texts, then one per
text over its top-k images, each image's states repeated per candidate. A tiny BLIP with random weights, random
32px images and random texts of 8 to 30 tokens padded to 35; both must give the same score matrices (to 1e-5, the
same -100 cells). The script prints each time and the ratio, and exits non-zero if the matrices differ.

    python benchmarks/bench_retrieval_eval.py [--images 1000] [--texts 5000] [--k-test 128] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from transformers_blip import BlipConfig, BlipForImageTextRetrieval, BlipTextConfig, BlipVisionConfig
from transformers_blip.evaluation import UNRANKED_SCORE, retrieval_scores
from transformers_blip.modeling_blip import itc_feature

TEXT_LENGTH = 35  # the original's max_length


def build_model(seed: int = 0) -> BlipForImageTextRetrieval:
    """A tiny retrieval model: 2-layer ViT, 2-layer MED, width 64. 2px patches make 257 image tokens for texts of at
    most 35, the proportion of BLIP (577 tokens at 384px), whose cross-attention reads far more image than text."""
    text = BlipTextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    vision = BlipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=2
    )
    torch.manual_seed(seed)
    return BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision)).eval()


def make_data(num_images: int, num_texts: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random images (I, 3, 32, 32) and texts: [CLS] words [SEP] of 8 to 30 tokens, padded to TEXT_LENGTH."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(num_images, 3, 32, 32, generator=generator)
    lengths = torch.randint(8, 31, (num_texts,), generator=generator)
    attention_mask = (torch.arange(TEXT_LENGTH)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(104, 126, (num_texts, TEXT_LENGTH), generator=generator)
    input_ids[:, 0] = 101
    input_ids[torch.arange(num_texts), lengths - 1] = 102
    return pixel_values, input_ids.masked_fill(attention_mask == 0, 0), attention_mask


@torch.no_grad()
def per_query_scores(
    model: BlipForImageTextRetrieval,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    k_test: int,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's evaluation: features in batches, then one ITM forward per query over its k candidates."""
    image_embeds = torch.cat(
        [
            model.vision_model(pixel_values[i : i + batch_size]).last_hidden_state
            for i in range(0, len(pixel_values), batch_size)
        ]
    )
    image_feat = itc_feature(model.vision_proj, image_embeds)
    text_feat = torch.cat(
        [
            model.get_text_features(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
            for i in range(0, len(input_ids), batch_size)
        ]
    )
    similarity = image_feat @ text_feat.t()  # (I, T)
    num_images, num_texts = similarity.shape

    score_i2t = torch.full((num_images, num_texts), UNRANKED_SCORE)
    k = min(k_test, num_texts)
    for image in range(num_images):
        topk_sim, topk_idx = similarity[image].topk(k)
        logits, _ = model.itm_logits(
            input_ids[topk_idx], attention_mask[topk_idx], image_embeds[image].repeat(k, 1, 1)
        )
        score_i2t[image, topk_idx] = logits[:, 1] + topk_sim

    score_t2i = torch.full((num_texts, num_images), UNRANKED_SCORE)
    k = min(k_test, num_images)
    for text in range(num_texts):
        topk_sim, topk_idx = similarity[:, text].topk(k)
        logits, _ = model.itm_logits(
            input_ids[text].repeat(k, 1), attention_mask[text].repeat(k, 1), image_embeds[topk_idx]
        )
        score_t2i[text, topk_idx] = logits[:, 1] + topk_sim
    return score_i2t, score_t2i


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def same_scores(ours: torch.Tensor, reference: torch.Tensor) -> tuple[bool, float]:
    """Whether two score matrices agree (the same -100 cells, the rest to 1e-5) and their largest difference."""
    same_cells = torch.equal(ours == UNRANKED_SCORE, reference == UNRANKED_SCORE)
    difference = float((ours - reference).abs().max())
    return same_cells and difference <= 1e-5, difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--texts", type=int, default=5000)
    parser.add_argument("--k-test", type=int, default=128)
    parser.add_argument("--max-pairs-per-forward", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model()
    warmup = make_data(8, 40)
    per_query_scores(model, *warmup, k_test=4)  # first calls pay one-off costs (allocator, kernel selection)
    retrieval_scores(model, *warmup, k_test=4)
    data = make_data(args.images, args.texts)
    print(f"{args.images} images x {args.texts} texts, k_test {args.k_test}, {torch.get_num_threads()} threads")
    (loop_i2t, loop_t2i), loop_seconds = timed(per_query_scores, model, *data, k_test=args.k_test)
    (ours_i2t, ours_t2i), ours_seconds = timed(
        retrieval_scores, model, *data, k_test=args.k_test, max_pairs_per_forward=args.max_pairs_per_forward
    )
    same_i2t, difference_i2t = same_scores(ours_i2t, loop_i2t)
    same_t2i, difference_t2i = same_scores(ours_t2i, loop_t2i)
    print(f"per-query loop {loop_seconds:8.2f} s")
    print(f"ours           {ours_seconds:8.2f} s   {loop_seconds / ours_seconds:.2f}x")
    print(f"same matrices: i2t {same_i2t} (max diff {difference_i2t:.1e}), ", end="")
    print(f"t2i {same_t2i} (max diff {difference_t2i:.1e})")
    return 0 if same_i2t and same_t2i else 1


if __name__ == "__main__":
    raise SystemExit(main())
