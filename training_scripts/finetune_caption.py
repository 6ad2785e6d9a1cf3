"""Fine-tune BLIP for captioning with transformers' Trainer, as the original's train_caption.py.

Every epoch the model captions the validation images by beam search and is scored with the COCO metrics; the best
checkpoint by validation CIDEr is kept and evaluated on the test split. The run writes `metrics.json`, `results.md`
and `test_results.json` (the COCO results format). By default a tiny model learns the synthetic benchmark from
scratch; docs/finetuning.md has the paper's recipe on COCO.

    # one process; again with --resume_from_checkpoint to go on from the newest complete checkpoint
    python training_scripts/finetune_caption.py --output_dir outputs/caption
    # 8 GPUs, the original's recipe from a pretraining run (or an original .pth with --tokenizer_name_or_path)
    torchrun --nproc_per_node 8 training_scripts/finetune_caption.py --recipe coco_caption \\
        --model_name_or_path outputs/pretrain --source coco_karpathy --image_root /data/coco \\
        --train_file coco_karpathy_train.json --val_file coco_karpathy_val.json --test_file coco_karpathy_test.json
    # the same under accelerate
    accelerate launch --num_processes 8 training_scripts/finetune_caption.py --recipe coco_caption ...
    # evaluation only (the original's --evaluate): a COCO-fine-tuned captioner on NoCaps
    python training_scripts/finetune_caption.py --recipe nocaps --do_train false --model_name_or_path outputs/caption \
        --source nocaps --image_root /data/nocaps --val_file nocaps_val.json --test_file nocaps_test.json
    # a datasets dataset in place of --source: a hub id, a folder in the hub's layout, or a save_to_disk folder
    python training_scripts/finetune_caption.py --dataset_name my_captions --image_column image --caption_column text
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging

from transformers_blip import BlipForConditionalGeneration
from transformers_blip.data import BlipEvalTransform, BlipTrainTransform, HubDatasetArguments, SkipReport
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.hub import push_task_card
from transformers_blip.processing_blip import build_processor, build_tokenizer, text_config_token_kwargs
from transformers_blip.training import (
    MODEL_SIZES,
    BlipFineTuningTrainer,
    OptimizationArguments,
    apply_optimization_arguments,
    check_processes_train_together,
    optimizer_steps_per_epoch,
    parse_with_recipe,
    pretraining_config,
    seed_run,
)
from transformers_blip.training.captioning import (
    CAPTION_SOURCES,
    CaptionEvaluation,
    CaptionGeneration,
    caption_training_collator,
    evaluation_summary,
    load_caption_splits,
    load_captioner,
    run_summary,
    set_caption_prompt,
    training_regularisation,
    write_run_outputs,
)
from transformers_blip.training.checkpoints import (
    CheckpointError,
    allow_resume_without_path,
    checkpoint_to_resume,
)
from transformers_blip.training.finetuning import ResumableAugmentation
from transformers_blip.training.vocabulary import run_vocabulary

logger = logging.get_logger("finetune_caption")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A captioner (ours or transformers' layout), a pretraining run, or an original .pth; "
                  "default: a fresh model of --model_size."},
    )  # fmt: skip
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Default: beside the weights."})
    model_size: str = field(default="tiny", metadata={"help": f"Size of a fresh model: {sorted(MODEL_SIZES)}."})
    image_size: int = field(default=64, metadata={"help": "Image side (the paper fine-tunes at 384)."})
    vocab_size: int = field(default=30522, metadata={"help": "Most tokens of a fresh model's vocabulary."})
    label_smoothing: float | None = field(default=None, metadata={"help": "Default: the config's (0.1)."})
    dropout: float | None = field(default=None, metadata={"help": "Text dropout; default: the config's (0.1)."})


@dataclass
class DataArguments(HubDatasetArguments):
    """Where the data comes from: a `--source` of the script's own, or a `datasets` dataset (`--dataset_name`)."""

    source: str = field(default="synthetic", metadata={"help": "nocaps: evaluation only.", "choices": CAPTION_SOURCES})
    train_file: str | None = field(default=None, metadata={"help": "coco_karpathy_train.json."})
    val_file: str | None = field(default=None, metadata={"help": "coco_karpathy_val.json or nocaps_val.json."})
    test_file: str | None = field(default=None, metadata={"help": "coco_karpathy_test.json or nocaps_test.json."})
    image_root: str | None = field(default=None, metadata={"help": "Root of the files' image paths."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_human: int = field(default=2000, metadata={"help": "Training images (5 captions each)."})
    synthetic_num_val: int = field(default=200, metadata={"help": "Validation images."})
    synthetic_num_test: int = field(default=500, metadata={"help": "Test images."})
    min_crop_scale: float = field(default=0.5, metadata={"help": "Smallest random crop (BLIP: 0.5)."})
    randaugment: bool = field(default=True, metadata={"help": "RandAugment (2 operations, magnitude 5) as BLIP."})
    strict_data: bool = field(default=False, metadata={"help": "Stop at the first bad record or image."})


@dataclass
class CaptionArguments:
    prompt: str = field(default="a picture of ", metadata={"help": "Prepended to every caption, masked in the loss."})
    max_words: int = field(default=30, metadata={"help": "Words kept per training caption (BLIP: 30)."})
    num_beams: int = field(default=3, metadata={"help": "Beams of the evaluation's beam search."})
    max_length: int = field(default=20, metadata={"help": "Most tokens of a generated caption, prompt included."})
    min_length: int = field(default=5, metadata={"help": "Fewest tokens of a generated caption, prompt included."})
    eval_meteor: bool = field(default=False, metadata={"help": "METEOR every evaluation too (Java, ~10 s more)."})


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, CaptionArguments, OptimizationArguments, TrainingArguments)
    )
    allow_resume_without_path(parser)
    # The tiny run's optimisation; `--recipe coco_caption` sets the original's. Validation CIDEr every epoch picks
    # the best checkpoint. The collator reads `image` and `caption`, so Trainer must keep those columns. Images are
    # decoded in worker processes, as the original's 4; their random streams restart from seeds that Trainer's
    # checkpoints restore, which makes a resumed run see the augmentations of an uninterrupted one. `--do_train
    # false` evaluates --model_name_or_path on the validation and test splits without training.
    parser.set_defaults(
        do_train=True, output_dir="outputs/caption", learning_rate=3e-4, weight_decay=0.05, num_train_epochs=5,
        per_device_train_batch_size=32, per_device_eval_batch_size=32, logging_steps=10, eval_strategy="epoch",
        save_strategy="epoch", metric_for_best_model="CIDEr", greater_is_better=True, load_best_model_at_end=True,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=4,
        use_cpu=not torch.accelerator.is_available(),
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    model_args, data_args, caption_args, optimization_args, training_args = parse_with_recipe(parser, argv)
    if training_args.remove_unused_columns:
        parser.error("--remove_unused_columns must stay False: Trainer would drop the image and caption columns")
    check_processes_train_together(training_args)
    seed_run(training_args)  # before the model is built: its new weights are the run's first draws
    if not training_args.do_train and model_args.model_name_or_path is None:
        parser.error("evaluation only (--do_train false) needs the captioner to evaluate: --model_name_or_path")
    report = SkipReport(log_dir=os.path.join(training_args.output_dir, "skipped"), strict=data_args.strict_data)
    synthetic_kwargs = {
        "seed": data_args.synthetic_seed, "image_size": model_args.image_size,
        "num_human": data_args.synthetic_num_human, "num_val": data_args.synthetic_num_val,
        "num_test": data_args.synthetic_num_test,
    }  # fmt: skip
    with training_args.main_process_first(desc="building the dataset"):
        try:
            source = "hub" if reads_hub_dataset(data_args, data_args.source) else data_args.source
            train, val, test = load_caption_splits(
                source, data_args.train_file, data_args.val_file, data_args.test_file, data_args.image_root,
                caption_args.max_words, synthetic_kwargs, report=report, with_train=training_args.do_train,
                hub_arguments=data_args,
            )  # fmt: skip
        except (OSError, ValueError) as error:  # a missing or unreadable file, a wrong layout: named, no traceback
            raise SystemExit(f"error: {error}") from error
    try:
        resume = checkpoint_to_resume(training_args) if training_args.do_train else None
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from error
    captions = train["caption"] if train is not None else []
    model, tokenizer = start_model(model_args, training_args, captions, caption_args.prompt, resume)

    train_transform = ResumableAugmentation(
        lambda seed: BlipTrainTransform(
            model_args.image_size, scale=(data_args.min_crop_scale, 1.0), randaugment=data_args.randaugment, seed=seed
        )
    )
    generation = CaptionGeneration(
        caption_args.prompt, caption_args.num_beams, caption_args.max_length, caption_args.min_length
    )
    evaluation = CaptionEvaluation(
        tokenizer, BlipEvalTransform(model_args.image_size), generation,
        batch_size=training_args.per_device_eval_batch_size, meteor=caption_args.eval_meteor,
        num_workers=training_args.dataloader_num_workers, report=report,
    )  # fmt: skip
    processor = build_processor(tokenizer, model_args.image_size)  # saved with every checkpoint and the model
    trainer = BlipFineTuningTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=val, processing_class=processor,
        data_collator=caption_training_collator(
            tokenizer, train_transform, caption_args.prompt, caption_args.max_words, report
        ),
        task_evaluation=evaluation,
    )  # fmt: skip
    if not training_args.do_train:
        return evaluate_only(trainer, evaluation, val, test, model_args.model_name_or_path, generation, report)
    apply_optimization_arguments(trainer, optimization_args, optimizer_steps_per_epoch(train, training_args))
    try:
        trainer.train(resume_from_checkpoint=resume)
    except CheckpointError as error:  # a damaged or unsealed checkpoint: say which file, not a traceback
        raise SystemExit(f"error: {error}") from error
    trainer.save_model()  # the best checkpoint's weights, reloaded at the end of training
    trainer.save_state()
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    metrics = run_summary(trainer.state, trainer.args.metric_for_best_model, test_metrics, generation)
    if trainer.is_world_process_zero():
        write_run_outputs(training_args.output_dir, metrics, {"test": evaluation.results})
        report.finish(os.path.join(training_args.output_dir, "skipped.jsonl"))
        if training_args.push_to_hub:  # after Trainer's push of the weights, the card with the scores
            scores = {"val": metrics["val"], "test": metrics["test"]}
            push_task_card(
                model, trainer.hub_model_id, scores, data_args.dataset_name, training_args.output_dir,
                training_args.hub_token,
            )  # fmt: skip
    return metrics


def evaluate_only(trainer, evaluation, val, test, model_name_or_path: str, generation, report: SkipReport) -> dict:
    """Captions (and, where the splits have references, scores) the validation and test splits of the model as it
    was loaded; writes `metrics.json`, `results.md`, `val_results.json` and `test_results.json`."""
    val_metrics = trainer.evaluate(val, metric_key_prefix="val")
    val_results = evaluation.results
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    metrics = evaluation_summary(model_name_or_path, val_metrics, test_metrics, generation)
    if trainer.is_world_process_zero():
        output_dir = trainer.args.output_dir
        write_run_outputs(output_dir, metrics, {"val": val_results, "test": evaluation.results})
        report.finish(os.path.join(output_dir, "skipped.jsonl"))
    return metrics


def start_model(
    model_args: ModelArguments, training_args: TrainingArguments, captions: list[str], prompt: str, resume: str | None
):
    """The captioner and tokenizer the run starts from, with its training regularisation logged."""
    if model_args.model_name_or_path is None:
        if model_args.tokenizer_name_or_path and resume is None:
            tokenizer = build_tokenizer(vocab_file=model_args.tokenizer_name_or_path)
        else:  # trained once for every rank, or the resumed checkpoint's own
            texts = [prompt + caption for caption in captions]
            tokenizer = run_vocabulary(lambda: texts, model_args.vocab_size, training_args, resume)
        config = pretraining_config(model_args.model_size, model_args.image_size, text_config_token_kwargs(tokenizer))
        model, start = BlipForConditionalGeneration(config), "fresh"
    else:
        try:
            model, tokenizer, start = load_captioner(
                model_args.model_name_or_path, model_args.image_size, model_args.tokenizer_name_or_path
            )
        except (OSError, ValueError) as error:
            path = model_args.model_name_or_path
            raise SystemExit(f"error: cannot start from --model_name_or_path {path}: {error}") from error
    message = training_regularisation(model, start, model_args.label_smoothing, model_args.dropout)
    if message:
        logger.warning(message)
    set_caption_prompt(model.config, tokenizer, prompt)  # the model masks the prompt in its loss by default
    model.train()
    return model, tokenizer


if __name__ == "__main__":
    main(sys.argv[1:])
