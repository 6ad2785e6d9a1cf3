"""The main job, end to end on this machine: build a tiny BLIP captioner and its processor, save them, load them
back the way a user would (transformers' `pipeline`, remote code) and caption images.

    python training_scripts/demo.py [--output-dir outputs/demo]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image
from transformers import pipeline

from transformers_blip import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageTextProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    build_processor,
    build_tokenizer,
    text_config_token_kwargs,
)

WORDS = "a picture of red green blue square circle triangle small big left right on the".split()


def build_model(processor: BlipImageTextProcessor, image_size: int) -> BlipForConditionalGeneration:
    text_config = BlipTextConfig(
        **text_config_token_kwargs(processor),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=40,
    )
    vision_config = BlipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=image_size
    )
    return BlipForConditionalGeneration(BlipConfig(text_config=text_config, vision_config=vision_config)).eval()


def demo_images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    # A WordPiece vocabulary trained on a few words; BLIP's [DEC] and [ENC] are its last two ids.
    tokenizer = build_tokenizer(corpus=[" ".join(WORDS)] * 4, vocab_size=64)
    processor = build_processor(tokenizer, image_size=args.image_size)
    model = build_model(processor, args.image_size)
    save_dir = os.path.join(args.output_dir, "captioner")
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    print(f"saved a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter captioner to {save_dir}")

    captioner = pipeline("image-to-text", model=save_dir, trust_remote_code=True)
    for i, image in enumerate(demo_images(3, 80)):
        caption = captioner(image, prompt="a picture of", num_beams=3, max_length=12)[0]["generated_text"]
        print(f"image {i}: {caption!r} (random weights: the words are arbitrary)")


if __name__ == "__main__":
    main()
