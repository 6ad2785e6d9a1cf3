"""`blip caption` on a folder against transformers' own `pipeline("image-to-text")`, one image at a time.

The popular captioning scripts loop over images and call transformers' pipeline (or `generate`) on each. Here both
caption the same folder of synthetic images with the same weights: BLIP base (ViT-B/16 + BERT-base decoder), random
weights, at 384px, beam search with 3 beams, 5 to 20 tokens. Ours is the command a user runs (`blip caption FOLDER
--output captions.jsonl`: images decoded in DataLoader workers, captioned in batches); theirs is
`transformers.BlipForConditionalGeneration` loaded from the same weights written in transformers' layout
(convert/transformers_layout.py), through transformers' pipeline (`"image-to-text"`, which transformers 5 serves as
`"image-text-to-text"`, with an empty prompt). Both timings include loading the model. The
script prints images/s for each, the ratio and whether every caption is identical; it exits non-zero if any differs.

    python benchmarks/bench_caption_cli.py [--images 64] [--batch-size 8] [--num-workers 2] [--image-size 384]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from transformers.utils import logging as transformers_logging

from transformers_blip import BlipConfig, BlipForConditionalGeneration, build_processor, build_tokenizer
from transformers_blip.cli import main as blip
from transformers_blip.convert.transformers_layout import save_in_transformers_layout

NUM_BEAMS, MIN_LENGTH, MAX_LENGTH = 3, 5, 20


def write_vocab(path: Path, size: int) -> Path:
    """A BERT vocabulary of `size` entries (BERT's special tokens, then made-up words), for a tokenizer that can
    decode every id the random decoder may produce."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [f"w{number}" for number in range(size - len(specials))]
    path.write_text("\n".join(specials + words) + "\n", encoding="utf-8")
    return path


def write_images(folder: Path, count: int) -> list[Path]:
    """`count` photo-sized PNGs of smooth random colour fields (varied sizes, so resizing is part of the work)."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    paths = []
    for index in range(count):
        height, width = int(generator.integers(360, 520)), int(generator.integers(480, 680))
        coarse = generator.integers(0, 256, size=(height // 40 + 1, width // 40 + 1, 3), dtype=np.uint8)
        image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BILINEAR)
        paths.append(folder / f"image{index:03d}.png")
        image.save(paths[-1])
    return paths


def save_models(root: Path, image_size: int) -> tuple[Path, Path]:
    """Random BLIP base weights saved twice: in our layout with our processor, and in transformers' layout with
    transformers' own BLIP processor (same tokenizer, same resizing and normalisation)."""
    tokenizer = build_tokenizer(
        vocab_file=str(write_vocab(root / "vocab.txt", BlipConfig().text_config.vocab_size - 2))
    )
    config = BlipConfig(vision_config={"image_size": image_size}, text_config={"vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    ours, theirs = root / "ours", root / "transformers"
    model.save_pretrained(ours)
    processor = build_processor(tokenizer, image_size=image_size)
    processor.save_pretrained(ours)
    save_in_transformers_layout(model, theirs)
    image_processor = transformers.BlipImageProcessorPil(**processor.image_processor.to_dict())
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(theirs)
    return ours, theirs


def caption_with_blip(model_dir: Path, folder: Path, output: Path, args: argparse.Namespace) -> float:
    command = ["caption", str(folder), "--model", str(model_dir), "--output", str(output), "--quiet"]
    command += ["--num-beams", str(NUM_BEAMS), "--min-length", str(MIN_LENGTH), "--max-length", str(MAX_LENGTH)]
    command += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    start = time.perf_counter()
    if blip(command) != 0:
        raise SystemExit("blip caption failed")
    return time.perf_counter() - start


def caption_with_transformers(model_dir: Path, images: list[Path]) -> tuple[dict[str, str], float]:
    start = time.perf_counter()
    model = transformers.BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = transformers.BlipProcessor.from_pretrained(model_dir)
    # transformers 5 serves "image-to-text" as "image-text-to-text" (asking for the name change in a warning), whose
    # BLIP prompt "" is `[DEC]` alone: an unprompted caption.
    captioner = transformers.pipeline("image-text-to-text", model=model, processor=processor, device="cpu")
    settings = {"num_beams": NUM_BEAMS, "min_length": MIN_LENGTH, "max_length": MAX_LENGTH}
    captions = {}
    for path in images:  # one image per call, as the popular scripts do
        captions[str(path)] = captioner(images=PIL.Image.open(path), text="", generate_kwargs=settings)[0][
            "generated_text"
        ]
    return captions, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images in the folder (default 64)")
    parser.add_argument("--batch-size", type=int, default=8, help="blip caption's --batch-size (default 8)")
    parser.add_argument("--num-workers", type=int, default=2, help="blip caption's --num-workers (default 2)")
    parser.add_argument("--image-size", type=int, default=384, help="the model's input size (default 384)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        images = write_images(root / "images", args.images)
        ours_dir, theirs_dir = save_models(root, args.image_size)
        their_captions, their_time = caption_with_transformers(theirs_dir, images)
        our_time = caption_with_blip(ours_dir, root / "images", root / "captions.jsonl", args)
        records = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
        our_captions = {record["image"]: record["caption"] for record in records}

    same = sum(our_captions.get(path) == caption.strip() for path, caption in their_captions.items())
    their_rate, our_rate = len(images) / their_time, len(images) / our_time
    print(
        f"BLIP base, {len(images)} images at {args.image_size}px, beam {NUM_BEAMS}, {MIN_LENGTH}-{MAX_LENGTH} tokens, "
        f"{torch.get_num_threads()} threads; blip caption batch {args.batch_size}, {args.num_workers} workers"
    )
    print(f"{'':<34} {'img/s':>7}")
    print(f"{'transformers pipeline, one by one':<34} {their_rate:>7.3f}")
    print(f"{'blip caption':<34} {our_rate:>7.3f}")
    print(f"ratio {our_rate / their_rate:.2f}x; identical captions: {same}/{len(images)}")
    return 0 if same == len(images) else 1


if __name__ == "__main__":
    raise SystemExit(main())
