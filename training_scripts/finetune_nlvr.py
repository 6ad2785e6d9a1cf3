"""Fine-tune BLIP for NLVR2 (`BlipForVisualReasoning`) as the original's train_nlvr.py, with transformers' Trainer.

By default a tiny model learns the synthetic benchmark's image pairs; `--recipe nlvr2` sets the original's values
(384 px, 15 epochs, rate 3e-5 on a cosine per epoch). Each epoch is validated by accuracy on dev
(`--validation_files`, the original's choice) or on held-out training pairs (`--validation_share`), the best
checkpoint is kept and classifies the test pairs: `nlvr_result.json`, `metrics.json`, `results.md`.

    python training_scripts/finetune_nlvr.py --output_dir outputs/nlvr
    # the original's data and recipe from a pretraining run, 8 GPUs
    torchrun --nproc_per_node 8 training_scripts/finetune_nlvr.py --recipe nlvr2 --source nlvr_json \\
        --train_files nlvr_train.json --validation_files nlvr_dev.json --test_files nlvr_test.json \\
        --image_root /data/nlvr2 --pretraining_checkpoint outputs/pretrain --bf16
    accelerate launch --num_processes 8 training_scripts/finetune_nlvr.py --recipe nlvr2 ...
    # a datasets dataset in place of --source; its pairs' columns by default left_image, right_image, sentence, label
    python training_scripts/finetune_nlvr.py --dataset_name my_nlvr2 --label_column answer

Again with --resume_from_checkpoint to go on from the newest complete checkpoint. `--do_train false` evaluates
`--model_name_or_path` without training: validation accuracy where there is a validation split, the test pairs.
Under several processes every evaluation is split across the ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, IntervalStrategy, TrainingArguments

from transformers_blip.data import BlipTrainTransform, HubDatasetArguments, SkipReport
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.evaluation.vqa_accuracy import nlvr_accuracy
from transformers_blip.hub import push_task_card
from transformers_blip.modeling_nlvr import BlipForVisualReasoning
from transformers_blip.processing_blip import build_processor
from transformers_blip.training import (
    BlipFineTuningTrainer,
    DecodingCollator,
    OptimizationArguments,
    check_processes_train_together,
    parse_with_recipe,
    seed_run,
)
from transformers_blip.training.checkpoints import allow_resume_without_path, checkpoint_to_resume
from transformers_blip.training.finetuning import ResumableAugmentation, train_or_evaluate
from transformers_blip.training.nlvr import (
    NlvrCollator,
    decode_pairs,
    load_nlvr_splits,
    nlvr_evaluation,
    nlvr_texts,
    predict_pairs,
    write_nlvr_results,
)
from transformers_blip.training.vqa import start_task_model, write_run_summary

SOURCES = ("synthetic", "nlvr_json")


@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": "Size of a fresh model: tiny, base or large."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved BlipForVisualReasoning."})
    pretraining_checkpoint: str | None = field(default=None, metadata={"help": "Start from a pretraining run."})
    image_size: int = field(default=64, metadata={"help": "Image side (the original fine-tunes NLVR2 at 384)."})
    vocab_size: int = field(default=30522, metadata={"help": "Most tokens of a fresh model's vocabulary."})
    max_words: int = field(default=40, metadata={"help": "Words per statement kept by the cleaning (BLIP: 40)."})
    dropout: float | None = field(default=None, metadata={"help": "Text dropout; default: the config's (BLIP: 0.1)."})


@dataclass
class DataArguments(HubDatasetArguments):
    """Where the data comes from: a `--source` of the script's own, or a `datasets` dataset (`--dataset_name`)."""

    source: str = field(
        default="synthetic", metadata={"help": "BLIP's NLVR2 JSON or the benchmark.", "choices": SOURCES}
    )
    train_files: list[str] = field(default_factory=list, metadata={"help": "nlvr_train.json."})
    validation_files: list[str] = field(default_factory=list, metadata={"help": "nlvr_dev.json."})
    test_files: list[str] = field(default_factory=list, metadata={"help": "nlvr_test.json."})
    image_root: str | None = field(default=None, metadata={"help": "Root of the image paths."})
    validation_share: float = field(default=0.1, metadata={"help": "Training pairs held out without dev files."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_nlvr: int = field(default=1500, metadata={"help": "Synthetic training pairs."})
    synthetic_num_nlvr_test: int = field(default=375, metadata={"help": "Synthetic test pairs."})
    min_crop_scale: float = field(default=0.5, metadata={"help": "Smallest random crop (BLIP: 0.5)."})
    randaugment: bool = field(default=True, metadata={"help": "RandAugment (2 operations, magnitude 5)."})
    strict_data: bool = field(default=False, metadata={"help": "Stop at the first bad record or image."})


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, OptimizationArguments, TrainingArguments))
    allow_resume_without_path(parser)
    # The collator reads the image pair and statement columns, which the model's forward does not name.
    parser.set_defaults(
        do_train=True, output_dir="outputs/nlvr", learning_rate=2e-4, weight_decay=0.05, num_train_epochs=5,
        per_device_train_batch_size=32, per_device_eval_batch_size=64, logging_steps=10, eval_strategy="epoch",
        save_strategy="epoch", metric_for_best_model="accuracy", greater_is_better=True,
        load_best_model_at_end=True, report_to="none", remove_unused_columns=False,
        use_cpu=not torch.accelerator.is_available(),
    )  # fmt: skip
    return parser


def main(args: list[str] | None = None) -> dict:
    parser = build_parser()
    model_args, data_args, optimization_args, training_args = parse_with_recipe(parser, args)
    check_processes_train_together(training_args)
    seed_run(training_args)  # before the model is built: its new weights are the run's first draws
    if not training_args.do_train and model_args.model_name_or_path is None:
        parser.error("evaluation only (--do_train false) needs the model to evaluate: --model_name_or_path")
    report = SkipReport(log_dir=os.path.join(training_args.output_dir, "skipped"), strict=data_args.strict_data)
    synthetic = {"seed": data_args.synthetic_seed, "image_size": model_args.image_size}
    synthetic.update(num_nlvr=data_args.synthetic_num_nlvr, num_nlvr_test=data_args.synthetic_num_nlvr_test)
    try:
        with training_args.main_process_first(desc="building the dataset"):
            source = "hub" if reads_hub_dataset(data_args, data_args.source) else data_args.source
            splits = load_nlvr_splits(
                source, data_args.train_files, data_args.validation_files, data_args.test_files,
                data_args.image_root, data_args.validation_share, training_args.seed, synthetic, report,
                model_args.max_words, hub_arguments=data_args,
            )  # fmt: skip
        model, tokenizer = start_task_model(
            BlipForVisualReasoning, model_args.image_size, model_args.model_size, model_args.model_name_or_path,
            model_args.pretraining_checkpoint, lambda: nlvr_texts(splits["train"]), model_args.vocab_size,
            checkpoint_to_resume(training_args) if training_args.do_train else None, training_args,
            dropout=model_args.dropout,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # a missing file, a bad argument, a damaged checkpoint: say which
        raise SystemExit(f"error: {error}") from error
    if splits["validation"] is None:  # no validation: the last epoch classifies the test pairs
        training_args.eval_strategy, training_args.load_best_model_at_end = IntervalStrategy.NO, False

    # Pairs are mirrored as a whole in the collator; each image is cropped and augmented without a flip of its own,
    # from torch's generator, which checkpoints restore: exact resumes with or without workers.
    train_transform = ResumableAugmentation(
        lambda seed: BlipTrainTransform(
            model_args.image_size, scale=(data_args.min_crop_scale, 1.0), allow_flip=False,
            randaugment=data_args.randaugment, seed=seed,
        )
    )  # fmt: skip
    collate = NlvrCollator(tokenizer, train_transform, mirror_probability=0.5)
    eval_batch_size = training_args.per_device_eval_batch_size
    processor = build_processor(tokenizer, model_args.image_size)  # saved with every checkpoint and the model
    trainer = BlipFineTuningTrainer(
        model=model, args=training_args, train_dataset=splits["train"], eval_dataset=splits["validation"],
        data_collator=DecodingCollator(decode_pairs(report), collate), processing_class=processor,
        task_evaluation=nlvr_evaluation(tokenizer, model_args.image_size, eval_batch_size, report),
    )  # fmt: skip
    metrics = train_or_evaluate(trainer, splits, optimization_args, model_args.model_name_or_path)

    test = splits["test"]
    # The best checkpoint's weights (reloaded by Trainer) classify the test pairs, each rank its share.
    predictions = predict_pairs(model.eval(), test, tokenizer, model_args.image_size, eval_batch_size, report)
    metrics["test_accuracy"] = nlvr_accuracy(predictions, test["label"])["accuracy"]
    metrics.update(test_pairs=len(test), skipped=len(report))
    if trainer.is_world_process_zero():
        write_nlvr_results(predictions, test, os.path.join(training_args.output_dir, "nlvr_result.json"))
        write_run_summary(training_args.output_dir, "NLVR2 fine-tuning", metrics, ["Predictions: nlvr_result.json."])
        report.finish(os.path.join(training_args.output_dir, "skipped.jsonl"))
        if training_args.push_to_hub and training_args.do_train:  # after Trainer's push of the weights, the card
            accuracy = {name: metrics[name] for name in ("validation_accuracy", "test_accuracy") if name in metrics}
            push_task_card(
                model, trainer.hub_model_id, accuracy, data_args.dataset_name, training_args.output_dir,
                training_args.hub_token,
            )  # fmt: skip
    return metrics


if __name__ == "__main__":
    main()
