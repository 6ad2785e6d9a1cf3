"""Fine-tune BLIP for image-text retrieval with transformers' Trainer, as the original's train_retrieval.py.

ITC with momentum encoders and queues (every caption of an image a positive) plus ITM with hard negatives; no LM
loss. Every epoch the model ranks the validation split (ITC top `--k_test`, re-ranked by ITM); the best checkpoint by
the mean recall `r_mean` is kept and ranks the test split. The run writes the fine-tuned `BlipForImageTextRetrieval`
with its processor, `metrics.json`, `results.md` and `retrieval_result.json` (each image's and text's 10 best
candidates). By default a tiny model learns the synthetic benchmark from scratch; docs/finetuning.md has the paper's
recipes on COCO and Flickr30K.

    # one process; again with --resume_from_checkpoint to go on from the newest complete checkpoint
    python training_scripts/finetune_retrieval.py --output_dir outputs/retrieval
    # 8 GPUs, the original's COCO recipe from a pretraining run
    torchrun --nproc_per_node 8 training_scripts/finetune_retrieval.py --recipe coco_retrieval \\
        --pretraining_checkpoint outputs/pretrain --source coco_karpathy --image_root /data/coco \\
        --train_file coco_karpathy_train.json --val_file coco_karpathy_val.json --test_file coco_karpathy_test.json
    # the same under accelerate
    accelerate launch --num_processes 8 training_scripts/finetune_retrieval.py --recipe coco_retrieval ...
    # evaluation only: a COCO-fine-tuned head on Flickr30K's validation and test splits, zero-shot
    python training_scripts/finetune_retrieval.py --recipe flickr_retrieval --do_train false \
        --model_name_or_path outputs/retrieval_coco --source coco_karpathy --image_root /data/flickr30k \
        --val_file flickr30k_val.json --test_file flickr30k_test.json
    # a datasets dataset in place of --source (a hub id, a folder in the hub's layout, a save_to_disk folder)
    python training_scripts/finetune_retrieval.py --dataset_name my_flickr --caption_column text

Under gradient accumulation ITC still contrasts each micro-batch with its own keys and the queue, which is what keeps
its negatives many.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import HfArgumentParser, TrainingArguments

from transformers_blip.data import BlipTrainTransform, HubDatasetArguments, SkipReport
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.hub import push_task_card
from transformers_blip.processing_blip import build_processor
from transformers_blip.training import (
    MODEL_SIZES,
    BlipFineTuningTrainer,
    MomentumUpdateCallback,
    OptimizationArguments,
    apply_optimization_arguments,
    check_processes_train_together,
    optimizer_steps_per_epoch,
    parse_with_recipe,
    seed_run,
)
from transformers_blip.training.captioning import load_caption_splits
from transformers_blip.training.checkpoints import CheckpointError, allow_resume_without_path, checkpoint_to_resume
from transformers_blip.training.finetuning import ResumableAugmentation
from transformers_blip.training.retrieval import (
    RetrievalEvaluation,
    retrieval_evaluation_summary,
    retrieval_run_summary,
    retrieval_training_collator,
    retrieval_training_model,
    start_retrieval_head,
    write_retrieval_outputs,
)

SOURCES = ("synthetic", "coco_karpathy")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A BlipForImageTextRetrieval (ours or transformers' layout) or an original .pth; "
                  "default: a fresh model of --model_size."},
    )  # fmt: skip
    pretraining_checkpoint: str | None = field(default=None, metadata={"help": "Start from a pretraining run."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "The tokenizer of an original .pth."})
    model_size: str = field(default="tiny", metadata={"help": f"Size of a fresh model: {sorted(MODEL_SIZES)}."})
    image_size: int = field(default=64, metadata={"help": "Image side (the paper fine-tunes at 384)."})
    vocab_size: int = field(default=30522, metadata={"help": "Most tokens of a fresh model's vocabulary."})
    dropout: float | None = field(default=None, metadata={"help": "Text dropout; default: the config's (0.1)."})


@dataclass
class DataArguments(HubDatasetArguments):
    """Where the data comes from: a `--source` of the script's own, or a `datasets` dataset (`--dataset_name`)."""

    source: str = field(
        default="synthetic",
        metadata={"help": "The benchmark, or Karpathy JSON (COCO or Flickr30K).", "choices": SOURCES},
    )
    train_file: str | None = field(default=None, metadata={"help": "coco_karpathy_train.json / flickr30k_train.json."})
    val_file: str | None = field(default=None, metadata={"help": "coco_karpathy_val.json / flickr30k_val.json."})
    test_file: str | None = field(default=None, metadata={"help": "coco_karpathy_test.json / flickr30k_test.json."})
    image_root: str | None = field(default=None, metadata={"help": "Root of the files' image paths."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_human: int = field(default=2000, metadata={"help": "Training images (5 captions each)."})
    synthetic_num_val: int = field(default=200, metadata={"help": "Validation images."})
    synthetic_num_test: int = field(default=500, metadata={"help": "Test images."})
    min_crop_scale: float = field(default=0.5, metadata={"help": "Smallest random crop (BLIP: 0.5)."})
    randaugment: bool = field(default=True, metadata={"help": "RandAugment (2 operations, magnitude 5) as BLIP."})
    strict_data: bool = field(default=False, metadata={"help": "Stop at the first bad record or image."})


@dataclass
class RetrievalArguments:
    queue_size: int | None = field(default=None, metadata={"help": "ITC queue length; default: the config's."})
    momentum: float | None = field(default=None, metadata={"help": "Momentum encoders' EMA rate; default: config's."})
    alpha: float = field(default=0.4, metadata={"help": "Weight of the momentum targets, ramped over epoch 1."})
    negative_all_rank: bool = field(default=False, metadata={"help": "ITM negatives from every rank's batch."})
    k_test: int = field(default=128, metadata={"help": "Candidates re-ranked by ITM (COCO 256, Flickr30K 128)."})
    max_words: int = field(default=30, metadata={"help": "Words kept per caption (BLIP: 30)."})
    max_length: int = field(default=35, metadata={"help": "Tokens kept per caption (BLIP: 35)."})
    vision_gradient_checkpointing_layers: int = field(
        default=0, metadata={"help": "Recompute the last N ViT blocks in the backward pass (BLIP: 4), 0 for none."}
    )


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, RetrievalArguments, OptimizationArguments, TrainingArguments)
    )
    allow_resume_without_path(parser)
    # The tiny run's optimisation; `--recipe coco_retrieval` / `flickr_retrieval` set the original's. Validation
    # r_mean every epoch picks the best checkpoint. The collator reads `image`, `caption` and `image_id`, so Trainer
    # must keep those columns. `--do_train false` ranks the validation and test splits with the model as it starts.
    parser.set_defaults(
        do_train=True, output_dir="outputs/retrieval", learning_rate=3e-4, weight_decay=0.05, num_train_epochs=5,
        per_device_train_batch_size=32, per_device_eval_batch_size=64, logging_steps=10, eval_strategy="epoch",
        save_strategy="epoch", metric_for_best_model="r_mean", greater_is_better=True, load_best_model_at_end=True,
        report_to="none", remove_unused_columns=False, dataloader_num_workers=2,
        use_cpu=not torch.accelerator.is_available(),
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    model_args, data_args, retrieval_args, optimization_args, training_args = parse_with_recipe(parser, argv)
    if training_args.remove_unused_columns:
        parser.error("--remove_unused_columns must stay False: Trainer would drop the image and caption columns")
    check_processes_train_together(training_args)
    seed_run(training_args)  # before the model is built: its new weights are the run's first draws
    if not training_args.do_train and not (model_args.model_name_or_path or model_args.pretraining_checkpoint):
        parser.error(
            "evaluation only (--do_train false) needs a model: --model_name_or_path or --pretraining_checkpoint"
        )
    if retrieval_args.vision_gradient_checkpointing_layers < 0:
        parser.error("--vision_gradient_checkpointing_layers counts the last ViT blocks to checkpoint: 0 or more")
    report = SkipReport(log_dir=os.path.join(training_args.output_dir, "skipped"), strict=data_args.strict_data)
    synthetic_kwargs = {
        "seed": data_args.synthetic_seed, "image_size": model_args.image_size,
        "num_human": data_args.synthetic_num_human, "num_val": data_args.synthetic_num_val,
        "num_test": data_args.synthetic_num_test,
    }  # fmt: skip
    try:
        with training_args.main_process_first(desc="building the dataset"):
            source = "hub" if reads_hub_dataset(data_args, data_args.source) else data_args.source
            train, val, test = load_caption_splits(
                source, data_args.train_file, data_args.val_file, data_args.test_file, data_args.image_root,
                retrieval_args.max_words, synthetic_kwargs, report=report, with_train=training_args.do_train,
                hub_arguments=data_args,
            )  # fmt: skip
        resume = checkpoint_to_resume(training_args) if training_args.do_train else None
        head, tokenizer, start = start_retrieval_head(
            model_args.image_size, model_args.model_size, model_args.model_name_or_path,
            model_args.pretraining_checkpoint, model_args.tokenizer_name_or_path, lambda: list(train["caption"]),
            model_args.vocab_size, resume, training_args, model_args.dropout,
        )  # fmt: skip
    except (OSError, ValueError) as error:  # a missing file, a bad argument, a damaged checkpoint: say which
        raise SystemExit(f"error: {error}") from error
    evaluation = RetrievalEvaluation(
        tokenizer, model_args.image_size, retrieval_args.k_test, retrieval_args.max_words, retrieval_args.max_length,
        batch_size=training_args.per_device_eval_batch_size,
    )  # fmt: skip
    if not training_args.do_train:
        return evaluate_only(head, tokenizer, evaluation, training_args, val, test, model_args, start, report)
    steps_per_epoch = optimizer_steps_per_epoch(train, training_args)
    model = retrieval_training_model(
        head, steps_per_epoch, retrieval_args.queue_size, retrieval_args.alpha, retrieval_args.momentum,
        retrieval_args.negative_all_rank, retrieval_args.vision_gradient_checkpointing_layers,
    )  # fmt: skip
    del head

    # Augmentations drawn from torch's generator, which checkpoints restore: exact resumes with or without workers.
    train_transform = ResumableAugmentation(
        lambda seed: BlipTrainTransform(
            model_args.image_size, scale=(data_args.min_crop_scale, 1.0), randaugment=data_args.randaugment,
            seed=seed,
        )
    )  # fmt: skip
    trainer = BlipFineTuningTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
        data_collator=retrieval_training_collator(
            tokenizer, train_transform, retrieval_args.max_words, retrieval_args.max_length, report
        ),
        callbacks=[MomentumUpdateCallback()], task_evaluation=evaluation,
    )  # fmt: skip
    apply_optimization_arguments(trainer, optimization_args, steps_per_epoch)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except CheckpointError as error:  # a damaged or unsealed checkpoint: say which file, not a traceback
        raise SystemExit(f"error: {error}") from error
    trainer.save_state()
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")  # the best checkpoint, reloaded at the end
    summary = retrieval_run_summary(trainer.state, test_metrics, retrieval_args.k_test, start)
    if trainer.is_world_process_zero():
        # The fine-tuned head alone: no momentum weights, no queues.
        head = model.to_retrieval_model()
        head.save_pretrained(training_args.output_dir)
        processor = build_processor(tokenizer, model_args.image_size)
        processor.save_pretrained(training_args.output_dir)
        write_retrieval_outputs(training_args.output_dir, summary, evaluation.rankings)
        report.finish(os.path.join(training_args.output_dir, "skipped.jsonl"))
        if training_args.push_to_hub:  # the head and its processor (not Trainer's training model), then the card
            token = training_args.hub_token
            head.push_to_hub(trainer.hub_model_id, token=token)
            processor.push_to_hub(trainer.hub_model_id, token=token)
            scores = {"val": summary["val"], "test": summary["test"]}
            push_task_card(head, trainer.hub_model_id, scores, data_args.dataset_name, training_args.output_dir, token)
    return summary


def evaluate_only(head, tokenizer, evaluation, training_args, val, test, model_args, start, report) -> dict:
    """Ranks the validation and test splits with the head as it starts (the original's `--evaluate`, e.g. a
    COCO-fine-tuned head zero-shot on Flickr30K); writes `metrics.json`, `results.md` and the test rankings."""
    trainer = BlipFineTuningTrainer(
        model=head, args=training_args, eval_dataset=val, processing_class=tokenizer, task_evaluation=evaluation
    )
    val_metrics = trainer.evaluate(val, metric_key_prefix="val")
    test_metrics = trainer.evaluate(test, metric_key_prefix="test")
    evaluated = model_args.model_name_or_path or model_args.pretraining_checkpoint
    summary = retrieval_evaluation_summary(evaluated, val_metrics, test_metrics, evaluation.k_test, start)
    if trainer.is_world_process_zero():
        write_retrieval_outputs(training_args.output_dir, summary, evaluation.rankings)
        report.finish(os.path.join(training_args.output_dir, "skipped.jsonl"))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
