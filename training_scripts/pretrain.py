"""Pretrain BLIP (ITC with momentum distillation + ITM with hard negatives + LM) with transformers' Trainer.

By default it pretrains a tiny model on the synthetic benchmark (generated on the fly) and reports held-out ITC
retrieval recall at the end. docs/pretraining.md has the paper's recipe for real data and GPUs.

    # one process (CPU or one GPU); again with --resume_from_checkpoint to go on from the newest complete checkpoint
    python training_scripts/pretrain.py --output_dir outputs/pretrain
    # 8 GPUs on one node (DDP, NCCL)
    torchrun --nproc_per_node 8 training_scripts/pretrain.py --model_size base --image_size 224 \\
        --source caption_json --train_files coco.json vg.json cc3m.json --image_root /data --bf16
    # the same under accelerate (add --config_file for FSDP or DeepSpeed, --num_machines/--machine_rank for nodes)
    accelerate launch --num_processes 8 training_scripts/pretrain.py --model_size base --image_size 224 ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments

from transformers_blip.data import BlipEvalTransform, BlipTrainTransform, DecodeImages, SkipReport
from transformers_blip.evaluation import itc_retrieval_recall
from transformers_blip.modeling_pretraining import BlipForPreTraining
from transformers_blip.processing_blip import build_tokenizer, text_config_token_kwargs
from transformers_blip.training import (
    MODEL_SIZES,
    BlipPreTrainingTrainer,
    DecodingCollator,
    ImageTextCollator,
    check_processes_train_together,
    load_pretraining_pairs,
    optimizer_steps_per_epoch,
    pretraining_config,
    with_caption_lengths,
)
from transformers_blip.training.checkpoints import CheckpointError, allow_resume_without_path


@dataclass
class ModelArguments:
    model_size: str = field(default="tiny", metadata={"help": f"Encoder sizes: one of {sorted(MODEL_SIZES)}."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved BlipForPreTraining (weights, momentum and queues)."}
    )
    image_size: int = field(default=64, metadata={"help": "Training image side (the paper pretrains at 224)."})
    vocab_file: str | None = field(
        default=None,
        metadata={
            "help": "A BERT vocab.txt (bert-base-uncased's gives BLIP's ids); default: WordPiece trained on "
            "the training captions."
        },
    )
    vocab_size: int = field(default=30522, metadata={"help": "Most tokens of a vocabulary trained on the captions."})
    queue_size: int | None = field(
        default=None, metadata={"help": "ITC feature queue length; default 57600 (the paper), 0 for the tiny size."}
    )
    momentum: float | None = field(
        default=None, metadata={"help": "EMA rate of the momentum encoders; default 0.995 (the paper), 0.9 for tiny."}
    )
    alpha: float = field(default=0.4, metadata={"help": "Weight of the momentum model's soft ITC targets."})
    alpha_warmup_epochs: float = field(default=2.0, metadata={"help": "Epochs over which alpha ramps up from 0."})
    negative_all_rank: bool = field(default=False, metadata={"help": "Draw ITM hard negatives from every rank."})
    itc_global_keys: bool = field(
        default=False, metadata={"help": "Use this step's momentum features of every rank as ITC keys too."}
    )
    use_image_ids: bool = field(
        default=False, metadata={"help": "Pairs sharing an image id are ITC positives (the retrieval variant)."}
    )
    max_length: int = field(
        default=30, metadata={"help": "Tokens per caption: truncated to it, padded to it or to the batch's longest."}
    )


@dataclass
class DataArguments:
    source: str = field(
        default="synthetic",
        metadata={"help": "synthetic, coco_karpathy, caption_json, image_folder, parquet or webdataset."},
    )
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "Annotation files, an image folder, parquet files or tar shards."}
    )
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths in JSON files."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_human: int = field(default=2000, metadata={"help": "Clean synthetic images (5 captions each)."})
    synthetic_num_web: int = field(default=6000, metadata={"help": "Noisy synthetic web images (1 caption each)."})
    synthetic_num_test: int = field(default=500, metadata={"help": "Held-out synthetic images for retrieval."})
    synthetic_noise_rate: float = field(default=0.4, metadata={"help": "Share of noisy synthetic web captions."})
    min_crop_scale: float = field(default=0.2, metadata={"help": "Smallest random crop, as a share of the image."})
    randaugment: bool = field(default=True, metadata={"help": "RandAugment (2 operations, magnitude 5) as BLIP."})
    strict_data: bool = field(
        default=False,
        metadata={"help": "Stop at the first bad record or image, naming its file, instead of skipping it."},
    )


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    allow_resume_without_path(parser)
    # The paper's optimisation (AdamW, lr 3e-4, weight decay 0.05). `remove_unused_columns` is False because the
    # collator reads `image` and `caption`, which the model's forward does not name; True is refused below. Without
    # GPUs `use_cpu` is what lets Trainer join the processes of `torchrun` / `accelerate launch` (gloo).
    parser.set_defaults(
        output_dir="outputs/pretrain", learning_rate=3e-4, weight_decay=0.05, lr_scheduler_type="cosine",
        warmup_steps=0.05, num_train_epochs=1, per_device_train_batch_size=32, logging_steps=10,
        save_strategy="epoch", report_to="none", remove_unused_columns=False,
        use_cpu=not torch.accelerator.is_available(),
    )  # fmt: skip
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    if training_args.remove_unused_columns:
        parser.error("--remove_unused_columns must stay False: Trainer would drop the image and caption columns")
    check_processes_train_together(training_args)

    synthetic_kwargs = {  # --synthetic_seed -> seed, --synthetic_num_human -> num_human, ...
        name.removeprefix("synthetic_"): value
        for name, value in vars(data_args).items()
        if name.startswith("synthetic")
    }
    synthetic_kwargs["image_size"] = model_args.image_size
    # One report for the run: records lost while loading, shards that break while streaming, images that do not decode.
    skip_report = SkipReport(log_dir=os.path.join(training_args.output_dir, "skipped"), strict=data_args.strict_data)
    with training_args.main_process_first(desc="building the dataset"):
        train_dataset, held_out = load_pretraining_pairs(
            data_args.source,
            data_args.train_files,
            data_args.image_root,
            synthetic_kwargs,
            report=skip_report,
            count_load_skips=training_args.process_index == 0,
        )
    columns = train_dataset.column_names  # None for a stream whose first example is not read yet
    if model_args.use_image_ids and columns is not None and "image_id" not in columns:
        parser.error(f"--use_image_ids needs an image_id column; the {data_args.source} source has {columns}")

    if model_args.model_name_or_path:  # a saved pretraining run: its weights, momentum, queues and tokenizer
        model = BlipForPreTraining.from_pretrained(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    else:
        if model_args.vocab_file:
            tokenizer = build_tokenizer(vocab_file=model_args.vocab_file)
        else:
            with skip_report.not_counting():  # a pass over the captions for the vocabulary is not an epoch
                tokenizer = build_tokenizer(corpus=train_dataset["caption"], vocab_size=model_args.vocab_size)
        steps_per_epoch = optimizer_steps_per_epoch(train_dataset, training_args)
        config = pretraining_config(
            model_args.model_size,
            model_args.image_size,
            text_config_token_kwargs(tokenizer),
            queue_size=model_args.queue_size,
            momentum=model_args.momentum,
            alpha=model_args.alpha,
            alpha_warmup_steps=round(model_args.alpha_warmup_epochs * steps_per_epoch),
            negative_all_rank=model_args.negative_all_rank,
            itc_global_keys=model_args.itc_global_keys,
        )
        model = BlipForPreTraining(config)

    # Images are decoded and augmented (broken ones skipped and counted), texts tokenized, in the DataLoader workers.
    # `--train_sampling_strategy group_by_length` batches captions of similar length and pads them to the longest
    # of the batch, which nearly halves the time of a step on the synthetic benchmark.
    group_by_length = training_args.train_sampling_strategy == "group_by_length"
    if group_by_length:
        train_dataset = with_caption_lengths(train_dataset)
    train_transform = BlipTrainTransform(
        model_args.image_size, scale=(data_args.min_crop_scale, 1.0), randaugment=data_args.randaugment
    )
    tokenize = ImageTextCollator(
        tokenizer,
        image_transform=None,
        max_length=model_args.max_length,
        image_id_column="image_id" if model_args.use_image_ids else None,
        padding="longest" if group_by_length else "max_length",
    )
    collator = DecodingCollator(DecodeImages(train_transform, text_columns=("caption",), report=skip_report), tokenize)
    trainer = BlipPreTrainingTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except CheckpointError as error:  # a damaged or unsealed checkpoint: say which file, not a traceback
        raise SystemExit(f"error: {error}") from error
    trainer.save_model()
    trainer.save_state()
    if not trainer.is_world_process_zero():
        return
    skip_report.finish(os.path.join(training_args.output_dir, "skipped.jsonl"))
    if held_out is not None:
        eval_transform = BlipEvalTransform(model_args.image_size)
        metrics = itc_retrieval_recall(model, held_out, tokenizer, eval_transform, max_length=model_args.max_length)
        trainer.log_metrics("held_out", metrics)
        trainer.save_metrics("held_out", metrics)


if __name__ == "__main__":
    main()
