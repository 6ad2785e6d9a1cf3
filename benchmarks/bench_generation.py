"""Caption generation speed: ours against transformers' `BlipForConditionalGeneration`, same weights, same run.

BLIP base (ViT-B/16 + BERT-base decoder) with random weights, a batch of 8 images at 384px, greedy and beam search
with 3 beams, 20 tokens. Both models must produce identical token ids; the script prints images/s for each and the
ratio, and exits non-zero if the outputs differ.

    python benchmarks/bench_generation.py [--batch-size 8] [--repeats 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from transformers_blip import BlipConfig, BlipForConditionalGeneration


def build_models(seed: int = 0):
    config = BlipConfig()  # the base model at 384px
    torch.manual_seed(seed)
    ours = BlipForConditionalGeneration(config).eval()
    theirs = transformers.BlipForConditionalGeneration(
        transformers.BlipConfig.from_dict(config.to_transformers_dict())
    )
    theirs.load_state_dict(ours.state_dict(), strict=False)
    return ours, theirs.eval()


@torch.inference_mode()
def timed_generate(model, pixel_values: torch.Tensor, repeats: int, **settings) -> tuple[torch.Tensor, float]:
    """Best wall time of `repeats` runs (the least disturbed by other work on the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        ids = model.generate(pixel_values=pixel_values, **settings)
        best = min(best, time.perf_counter() - start)
    return ids, best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours, theirs = build_models()
    warmup = torch.randn(1, 3, 384, 384)
    for model in (theirs, ours):  # first calls pay one-off costs (allocator, kernel selection)
        timed_generate(model, warmup, 1, num_beams=3, max_length=4, min_length=1)
    pixel_values = torch.randn(args.batch_size, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    print(f"BLIP base, batch {args.batch_size}, 384px, {args.max_length} tokens, {torch.get_num_threads()} threads")
    print(f"{'decoding':<10} {'transformers img/s':>20} {'ours img/s':>12} {'ratio':>7}  identical ids")
    identical_everywhere = True
    for name, num_beams in (("greedy", 1), ("beam 3", 3)):
        settings = dict(num_beams=num_beams, max_length=args.max_length, min_length=5)
        their_ids, their_time = timed_generate(theirs, pixel_values, args.repeats, **settings)
        our_ids, our_time = timed_generate(ours, pixel_values, args.repeats, **settings)
        identical = our_ids.tolist() == their_ids.tolist()
        identical_everywhere &= identical
        their_rate, our_rate = args.batch_size / their_time, args.batch_size / our_time
        print(f"{name:<10} {their_rate:>20.3f} {our_rate:>12.3f} {our_rate / their_rate:>6.2f}x  {identical}")
    return 0 if identical_everywhere else 1


if __name__ == "__main__":
    raise SystemExit(main())
