"""Fine-tune BLIP for VQA (`BlipForQuestionAnswering`) as the original's train_vqa.py, with transformers' Trainer.

By default a tiny model learns the synthetic benchmark's VQA split; `--recipe vqa` sets the original's values
(480 px, 10 epochs, rate 2e-5 on a cosine per epoch, k = 128 ranked candidates). Each epoch is validated by VQA
accuracy on held-out images (`--validation_share`) or `--validation_files`, the best checkpoint is kept and answers
the test questions: `vqa_result.json` (the evaluation server's format), `metrics.json`, `results.md`.

    python training_scripts/finetune_vqa.py --output_dir outputs/vqa
    # the original's data and recipe from a pretraining run, 8 GPUs
    torchrun --nproc_per_node 8 training_scripts/finetune_vqa.py --recipe vqa --source vqa_json \\
        --train_files vqa_train.json vqa_val.json vg_qa.json --test_files vqa_test.json \\
        --answer_list answer_list.json --image_root /data/coco --vg_image_root /data/vg \\
        --validation_share 0.01 --pretraining_checkpoint outputs/pretrain --bf16
    accelerate launch --num_processes 8 training_scripts/finetune_vqa.py --recipe vqa ...
    # a datasets dataset in place of --source (a hub id, a folder in the hub's layout, a save_to_disk folder)
    python training_scripts/finetune_vqa.py --dataset_name my_vqa --question_column question --answers_column answers

Again with --resume_from_checkpoint to go on from the newest complete checkpoint. `--do_train false` evaluates
`--model_name_or_path` without training: validation accuracy where there is a validation split, the test answers.
Under several processes every evaluation is split across the ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, IntervalStrategy, TrainingArguments

from transformers_blip.data import BlipTrainTransform, DecodeImages, HubDatasetArguments, SkipReport
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.hub import push_task_card
from transformers_blip.modeling_blip import BlipForQuestionAnswering
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
from transformers_blip.training.vqa import (
    INFERENCE_MODES,
    RANK_SCORINGS,
    AnswerPredictor,
    VqaCollator,
    answer_accuracy,
    candidate_answers,
    has_human_answers,
    load_vqa_splits,
    start_task_model,
    vqa_evaluation,
    vqa_texts,
    write_run_summary,
    write_vqa_results,
)

SOURCES = ("synthetic", "vqa_json")


@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": "Size of a fresh model: tiny, base or large."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved BlipForQuestionAnswering."})
    pretraining_checkpoint: str | None = field(default=None, metadata={"help": "Start from a pretraining run."})
    image_size: int = field(default=64, metadata={"help": "Image side (the original fine-tunes VQA at 480)."})
    vocab_size: int = field(default=30522, metadata={"help": "Most tokens of a fresh model's vocabulary."})
    max_words: int = field(default=50, metadata={"help": "Words per question kept by the cleaning (BLIP: 50)."})
    label_smoothing: float | None = field(default=None, metadata={"help": "Default: the config's (BLIP: 0.1)."})
    dropout: float | None = field(default=None, metadata={"help": "Text dropout; default: the config's (BLIP: 0.1)."})


@dataclass
class InferenceArguments:
    inference: str = field(
        default="rank", metadata={"help": "rank (the candidate list) or generate.", "choices": INFERENCE_MODES}
    )
    k_test: int = field(default=128, metadata={"help": "Candidates scored in full per question."})
    rank_scoring: str = field(
        default="answer_loss", metadata={"help": "The rank inference's score.", "choices": RANK_SCORINGS}
    )
    answer_list: str | None = field(default=None, metadata={"help": "BLIP's answer_list.json (default: train's)."})
    num_beams: int = field(default=3, metadata={"help": "Beams of generate inference."})
    max_answer_length: int = field(default=10, metadata={"help": "Most tokens of a generated answer."})


@dataclass
class DataArguments(HubDatasetArguments):
    """Where the data comes from: a `--source` of the script's own, or a `datasets` dataset (`--dataset_name`)."""

    source: str = field(
        default="synthetic", metadata={"help": "BLIP's annotation JSON or the benchmark.", "choices": SOURCES}
    )
    train_files: list[str] = field(default_factory=list, metadata={"help": "VQA v2 train/val and vg_qa JSON."})
    validation_files: list[str] = field(default_factory=list, metadata={"help": "Questions to validate on."})
    test_files: list[str] = field(default_factory=list, metadata={"help": "Questions to answer at the end."})
    image_root: str | None = field(default=None, metadata={"help": "Root of the COCO image paths."})
    vg_image_root: str | None = field(default=None, metadata={"help": "Root of the Visual Genome image paths."})
    validation_share: float = field(default=0.1, metadata={"help": "Training images held out for validation."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_vqa: int = field(default=3000, metadata={"help": "Synthetic training questions."})
    synthetic_num_vqa_test: int = field(default=600, metadata={"help": "Synthetic test questions."})
    min_crop_scale: float = field(default=0.5, metadata={"help": "Smallest random crop (BLIP: 0.5)."})
    randaugment: bool = field(default=True, metadata={"help": "RandAugment (2 operations, magnitude 5)."})
    strict_data: bool = field(default=False, metadata={"help": "Stop at the first bad record or image."})


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, InferenceArguments, DataArguments, OptimizationArguments, TrainingArguments)
    )
    allow_resume_without_path(parser)
    # The collator reads the image, question and answer columns, which the model's forward does not name.
    parser.set_defaults(
        do_train=True, output_dir="outputs/vqa", learning_rate=2e-4, weight_decay=0.05, num_train_epochs=5,
        per_device_train_batch_size=32, per_device_eval_batch_size=64, logging_steps=10, eval_strategy="epoch",
        save_strategy="epoch", metric_for_best_model="accuracy", greater_is_better=True,
        load_best_model_at_end=True, report_to="none", remove_unused_columns=False,
        use_cpu=not torch.accelerator.is_available(),
    )  # fmt: skip
    return parser


def main(args: list[str] | None = None) -> dict:
    parser = build_parser()
    model_args, inference_args, data_args, optimization_args, training_args = parse_with_recipe(parser, args)
    check_processes_train_together(training_args)
    seed_run(training_args)  # before the model is built: its new weights are the run's first draws
    if not training_args.do_train and model_args.model_name_or_path is None:
        parser.error("evaluation only (--do_train false) needs the model to evaluate: --model_name_or_path")
    report = SkipReport(log_dir=os.path.join(training_args.output_dir, "skipped"), strict=data_args.strict_data)
    synthetic = {"seed": data_args.synthetic_seed, "image_size": model_args.image_size}
    synthetic.update(num_vqa=data_args.synthetic_num_vqa, num_vqa_test=data_args.synthetic_num_vqa_test)
    try:
        with training_args.main_process_first(desc="building the dataset"):
            source = "hub" if reads_hub_dataset(data_args, data_args.source) else data_args.source
            splits = load_vqa_splits(
                source, data_args.train_files, data_args.validation_files, data_args.test_files,
                data_args.image_root, data_args.vg_image_root, data_args.validation_share, training_args.seed,
                synthetic, report, model_args.max_words, hub_arguments=data_args,
            )  # fmt: skip
        candidates = candidate_answers(inference_args.answer_list, splits["train"])
        model, tokenizer = start_task_model(
            BlipForQuestionAnswering, model_args.image_size, model_args.model_size, model_args.model_name_or_path,
            model_args.pretraining_checkpoint, lambda: vqa_texts(splits["train"]), model_args.vocab_size,
            checkpoint_to_resume(training_args) if training_args.do_train else None, training_args,
            model_args.label_smoothing, model_args.dropout,
        )  # fmt: skip
        predictor = AnswerPredictor(
            tokenizer, model_args.image_size, inference_args.inference, candidates, inference_args.k_test,
            inference_args.rank_scoring, training_args.per_device_eval_batch_size,
            {"num_beams": inference_args.num_beams, "max_length": inference_args.max_answer_length}, report,
        )  # fmt: skip
    except (ValueError, OSError) as error:  # a missing file, a bad argument, a damaged checkpoint: say which
        raise SystemExit(f"error: {error}") from error
    if splits["validation"] is None:  # the original's run: no validation, the last epoch answers the test
        training_args.eval_strategy, training_args.load_best_model_at_end = IntervalStrategy.NO, False

    # Augmentations drawn from torch's generator, which checkpoints restore: exact resumes without workers too.
    train_transform = ResumableAugmentation(
        lambda seed: BlipTrainTransform(
            model_args.image_size, scale=(data_args.min_crop_scale, 1.0), randaugment=data_args.randaugment, seed=seed
        )
    )
    decode = DecodeImages(train_transform, text_columns=("question", "unique_answers"), report=report)
    processor = build_processor(tokenizer, model_args.image_size)  # saved with every checkpoint and the model
    trainer = BlipFineTuningTrainer(
        model=model, args=training_args, train_dataset=splits["train"], eval_dataset=splits["validation"],
        data_collator=DecodingCollator(decode, VqaCollator(tokenizer)), processing_class=processor,
        task_evaluation=vqa_evaluation(predictor),
    )  # fmt: skip
    metrics = train_or_evaluate(trainer, splits, optimization_args, model_args.model_name_or_path)

    test = splits["test"]
    # Every rank answers its share, with the best checkpoint's weights (reloaded by Trainer) or the given ones.
    predictions = predictor(model.eval(), test)
    if has_human_answers(test):
        metrics["test_accuracy"] = answer_accuracy(predictions, test)["accuracy"]
    metrics.update(test_questions=len(test), inference=inference_args.inference, skipped=len(report))
    if trainer.is_world_process_zero():
        write_vqa_results(predictions, os.path.join(training_args.output_dir, "vqa_result.json"))
        write_run_summary(training_args.output_dir, "VQA fine-tuning", metrics, ["Answers: vqa_result.json."])
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
