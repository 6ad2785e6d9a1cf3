"""The main job, end to end on a CPU in a few minutes, with a report.

1. Generate the synthetic benchmark and pretrain a tiny BLIP on it (ITC + ITM + LM) with training_scripts/pretrain.py.
2. Fine-tune its VQA head on the benchmark's questions with training_scripts/finetune_vqa.py (a short run: the
   captioner and the retrieval model are the pretraining's own decoder and encoders, which already caption and
   match; a VQA model has to learn to answer, which pretraining does not teach).
3. Use the models as a user would: caption held-out images through transformers' `pipeline("image-to-text")`,
   answer held-out questions through `pipeline("visual-question-answering")`, search the held-out images by text.
4. Write the report: an HTML page with the images, generated and reference captions, answers, search hits, the
   metrics, and plots of the three pretraining losses and the learning rate; print its path.

    python training_scripts/demo.py [--output-dir outputs/demo] [--max-steps 2000] [--vqa-epochs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from transformers_blip.report import DemoResults, demo_results, write_report

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE = 48
SEED = 0


def run(command: list[str]) -> None:
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)


def pretrain(output_dir: str, max_steps: int) -> None:
    """Runs pretrain.py: a tiny model, 3,000 synthetic images (1,000 clean with 5 captions, 2,000 noisy web)."""
    run([
        sys.executable, os.path.join(SCRIPTS, "pretrain.py"), "--output_dir", output_dir, "--model_size", "tiny",
        "--image_size", str(IMAGE_SIZE), "--synthetic_seed", str(SEED), "--synthetic_num_human", "1000",
        "--synthetic_num_web", "2000", "--synthetic_num_test", "100", "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "16", "--learning_rate", "1e-3", "--lr_scheduler_type",
        "constant_with_warmup", "--warmup_steps", "50", "--adam_beta2", "0.98", "--min_crop_scale", "1.0",
        "--randaugment", "false", "--logging_steps", str(logging_steps(max_steps)), "--save_strategy", "no",
        "--use_cpu", "--seed", "0", "--full_determinism",
    ])  # fmt: skip


def logging_steps(max_steps: int) -> int:
    """Every 100 steps (the learning test's means) or, for a short run, often enough to plot 20 points."""
    return max(1, min(100, max_steps // 20))


def fine_tune_vqa(pretrain_dir: str, output_dir: str, epochs: int) -> None:
    """Runs finetune_vqa.py from the pretraining: 3,000 questions, `epochs` epochs, 100 test questions answered."""
    run([
        sys.executable, os.path.join(SCRIPTS, "finetune_vqa.py"), "--output_dir", output_dir,
        "--pretraining_checkpoint", pretrain_dir, "--image_size", str(IMAGE_SIZE), "--synthetic_seed", str(SEED),
        "--synthetic_num_vqa", "3000", "--synthetic_num_vqa_test", "100", "--num_train_epochs", str(epochs),
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--dataloader_num_workers", "0", "--logging_steps", "50", "--use_cpu", "--seed", "0",
    ])  # fmt: skip


def print_results(results: DemoResults) -> None:
    print("\nCaptions of held-out images (beam search, 3 beams):")
    for row in results.captions:
        print(
            f"\n{row.image}: {row.caption}" + (f"   [not in the image: {', '.join(row.wrong)}]" if row.wrong else "")
        )
        for reference in row.references[:2]:
            print(textwrap.fill(reference, width=110, initial_indent="    reference: ", subsequent_indent=" " * 15))
    print("\nHeld-out questions (answers ranked among the training answers):")
    for row in results.answers:
        humans = ", ".join(dict.fromkeys(row.human_answers))
        print(f"  {row.question} -> {row.answer}   (humans: {humans}; score {row.accuracy:.2f})")
    print("\nText-to-image search over the held-out images, each described by its first reference:")
    for row in results.retrieval:
        print(f"  rank {row.target_rank}: {textwrap.shorten(row.query, 90)}")
    print("\nMetrics (%):")
    for name, value in results.metrics.items():
        print(f"  {name}: {value:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--max-steps", type=int, default=2000, help="pretraining steps (batch 16)")
    parser.add_argument("--vqa-epochs", type=int, default=5, help="VQA fine-tuning epochs (0: the pretraining's head)")
    parser.add_argument("--num-images", type=int, default=8, help="held-out images to caption and search")
    parser.add_argument("--num-questions", type=int, default=8, help="held-out questions to answer")
    args = parser.parse_args()

    pretrain_dir = os.path.join(args.output_dir, "pretrain")
    pretrain(pretrain_dir, args.max_steps)
    vqa_dir = None
    if args.vqa_epochs > 0:
        vqa_dir = os.path.join(args.output_dir, "vqa")
        fine_tune_vqa(pretrain_dir, vqa_dir, args.vqa_epochs)

    results = demo_results(
        pretrain_dir,
        args.output_dir,
        vqa_dir=vqa_dir,
        num_images=args.num_images,
        num_questions=args.num_questions,
        seed=SEED,
        image_size=IMAGE_SIZE,
    )
    print_results(results)
    report_dir = Path(args.output_dir) / "report"
    page = write_report(results, Path(pretrain_dir) / "trainer_state.json", report_dir)
    print(f"\nThe models are in {Path(args.output_dir) / 'models'}; the report is {page.resolve()}")


if __name__ == "__main__":
    main()
