"""The main job, end to end on a CPU in a few minutes.

1. Generate the synthetic benchmark and pretrain a tiny BLIP on it (ITC + ITM + LM) with training_scripts/pretrain.py.
2. Turn the pretraining checkpoint into a captioner (its image-grounded decoder), save it with its processor.
3. Load it back as a user would, through transformers' `pipeline("image-to-text")`, and caption held-out images,
   printed beside their reference captions, with the held-out ITC retrieval recall of the pretrained model.

    python training_scripts/demo.py [--output-dir outputs/demo] [--max-steps 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

from transformers import AutoTokenizer, pipeline

from transformers_blip import BlipForConditionalGeneration
from transformers_blip.benchmark import build_synthetic_benchmark
from transformers_blip.convert.pretraining import task_head_from_pretraining
from transformers_blip.processing_blip import build_processor

PRETRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain.py")
IMAGE_SIZE = 48
SEED = 0


def pretrain(output_dir: str, max_steps: int) -> None:
    """Runs pretrain.py: a tiny model, 3,000 synthetic images (1,000 clean with 5 captions, 2,000 noisy web)."""
    command = [
        sys.executable, PRETRAIN_SCRIPT, "--output_dir", output_dir, "--model_size", "tiny",
        "--image_size", str(IMAGE_SIZE), "--synthetic_seed", str(SEED), "--synthetic_num_human", "1000",
        "--synthetic_num_web", "2000", "--synthetic_num_test", "100", "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--lr_scheduler_type",
        "constant_with_warmup", "--warmup_steps", "50", "--adam_beta2", "0.98", "--min_crop_scale", "1.0",
        "--randaugment", "false", "--logging_steps", "100", "--save_strategy", "no", "--disable_tqdm", "true",
        "--use_cpu", "--seed", "0",
    ]  # fmt: skip
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--max-steps", type=int, default=2000, help="pretraining steps (batch 16)")
    parser.add_argument("--num-images", type=int, default=8, help="held-out images to caption")
    args = parser.parse_args()

    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    pretrain(pretrain_dir, args.max_steps)

    # The pretraining decoder becomes the captioner; it is saved with the processor that pipelines load.
    tokenizer = AutoTokenizer.from_pretrained(pretrain_dir)
    captioner = task_head_from_pretraining(BlipForConditionalGeneration, pretrain_dir)
    captioner_dir = os.path.join(args.output_dir, "captioner")
    captioner.save_pretrained(captioner_dir)
    build_processor(tokenizer, image_size=IMAGE_SIZE).save_pretrained(captioner_dir)

    captioner_pipeline = pipeline("image-to-text", model=captioner_dir, trust_remote_code=True)
    # The first test images of the benchmark pretrain.py generated (each record depends on the seed and its index).
    held_out = build_synthetic_benchmark(
        seed=SEED, image_size=IMAGE_SIZE, num_human=1, num_web=1, num_val=1, num_test=args.num_images, num_vqa=3,
        num_nlvr=1,
    )["test"]  # fmt: skip
    print(f"\nCaptions of {args.num_images} held-out images (beam search, 3 beams):")
    for index, row in enumerate(held_out):
        caption = captioner_pipeline(row["image"], max_length=40)[0]["generated_text"]
        print(f"\nimage {index}: {caption}")
        for reference in row["captions"][:2]:
            print(textwrap.fill(reference, width=110, initial_indent="    reference: ", subsequent_indent=" " * 15))

    with open(os.path.join(pretrain_dir, "held_out_results.json"), encoding="utf-8") as file:
        recall = json.load(file)
    print(
        f"\nHeld-out ITC retrieval over 100 images and 500 captions (recall@1 of chance: {recall['chance_r1']:.1f}%):"
        f"\n  image -> text R@1/5/10: {recall['txt_r1']:.1f} / {recall['txt_r5']:.1f} / {recall['txt_r10']:.1f}"
        f"\n  text -> image R@1/5/10: {recall['img_r1']:.1f} / {recall['img_r5']:.1f} / {recall['img_r10']:.1f}"
    )
    print(f"\nThe captioner is in {captioner_dir}: pipeline('image-to-text', model=..., trust_remote_code=True).")


if __name__ == "__main__":
    main()
