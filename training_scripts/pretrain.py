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
    # a datasets dataset in place of --source, streamed (a hub id, a folder in the hub's layout, a save_to_disk one)
    python training_scripts/pretrain.py --dataset_name my_pairs --caption_column text --streaming --max_steps 100000
    # the paper's recipe, from DeiT and BERT (every value of the preset can still be overridden)
    torchrun --nproc_per_node 8 training_scripts/pretrain.py --recipe pretrain_base \
        --vision_model_name_or_path facebook/deit-base-patch16-224 --text_model_name_or_path bert-base-uncased ...

The defaults are the tiny model's, which learns the synthetic benchmark on a CPU in minutes (Trainer's AdamW and
cosine schedule); `--recipe pretrain_base` or `pretrain_large` sets the original's optimisation and sizes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments

from transformers_blip.benchmark import benchmark_texts
from transformers_blip.convert.pretrained_encoders import (
    PretrainedSourceError,
    blip_tokenizer_for,
    load_pretrained_encoders,
)
from transformers_blip.data import BlipEvalTransform, BlipTrainTransform, DecodeImages, HubDatasetArguments, SkipReport
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.evaluation import itc_retrieval_recall
from transformers_blip.modeling_pretraining import BlipForPreTraining
from transformers_blip.processing_blip import build_tokenizer, text_config_token_kwargs
from transformers_blip.training import (
    MODEL_SIZES,
    BlipPreTrainingTrainer,
    DecodingCollator,
    ImageTextCollator,
    OptimizationArguments,
    apply_optimization_arguments,
    check_processes_train_together,
    load_pretraining_pairs,
    optimizer_steps_per_epoch,
    parse_with_recipe,
    pretraining_config,
    seed_run,
    with_caption_lengths,
)
from transformers_blip.training.checkpoints import CheckpointError, allow_resume_without_path, checkpoint_to_resume
from transformers_blip.training.vocabulary import run_vocabulary


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
    max_words: int = field(default=30, metadata={"help": "Words per caption kept by the cleaning (BLIP: 30)."})
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start the ViT from a ViT/DeiT (hub id or directory, transformers' or timm's layout)."},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Start the text encoder and decoder from BERT (hub id or directory); its vocab too."},
    )
    drop_path_rate: float | None = field(
        default=None,
        metadata={
            "help": "Stochastic depth of the ViT's last block (0.1 for ViT-L, as the original); default: the "
            "size's or the checkpoint's (0)."
        },
    )
    vision_gradient_checkpointing_layers: int | None = field(
        default=None,
        metadata={
            "help": "Checkpoint only the last N ViT blocks (the original's vit_ckpt_layer). Alone it checkpoints "
            "those ViT blocks only, as the original's vit_grad_ckpt; with --gradient_checkpointing the text "
            "layers too."
        },
    )


@dataclass
class DataArguments(HubDatasetArguments):
    """Where the pairs come from: a `--source` of the script's own, or a `datasets` dataset (`--dataset_name`)."""

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


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, OptimizationArguments, TrainingArguments))
    allow_resume_without_path(parser)
    # The tiny run's optimisation: BLIP's peak rate and weight decay under Trainer's AdamW and cosine schedule, which
    # let the tiny model learn in a thousand steps; `--recipe pretrain_base` sets the original's schedule, decay of
    # every parameter and no clipping. `remove_unused_columns` is False because the
    # collator reads `image` and `caption`, which the model's forward does not name; True is refused below. Without
    # GPUs `use_cpu` is what lets Trainer join the processes of `torchrun` / `accelerate launch` (gloo).
    parser.set_defaults(
        output_dir="outputs/pretrain", learning_rate=3e-4, weight_decay=0.05, lr_scheduler_type="cosine",
        warmup_steps=0.05, num_train_epochs=1, per_device_train_batch_size=32, logging_steps=10,
        save_strategy="epoch", report_to="none", remove_unused_columns=False,
        use_cpu=not torch.accelerator.is_available(), min_lr=1e-6,
    )  # fmt: skip
    return parser


def main() -> None:
    parser = build_parser()
    model_args, data_args, optimization_args, training_args = parse_with_recipe(parser)
    if training_args.remove_unused_columns:
        parser.error("--remove_unused_columns must stay False: Trainer would drop the image and caption columns")
    check_processes_train_together(training_args)
    seed_run(training_args)

    synthetic_kwargs = {  # --synthetic_seed -> seed, --synthetic_num_human -> num_human, ...
        name.removeprefix("synthetic_"): value
        for name, value in vars(data_args).items()
        if name.startswith("synthetic")
    }
    synthetic_kwargs["image_size"] = model_args.image_size
    # One report for the run: records lost while loading, shards that break while streaming, images that do not decode.
    skip_report = SkipReport(log_dir=os.path.join(training_args.output_dir, "skipped"), strict=data_args.strict_data)
    try:
        source = "hub" if reads_hub_dataset(data_args, data_args.source, can_stream=True) else data_args.source
    except ValueError as error:
        parser.error(str(error))
    with training_args.main_process_first(desc="building the dataset"):
        train_dataset, held_out = load_pretraining_pairs(
            source,
            data_args.train_files,
            data_args.image_root,
            synthetic_kwargs,
            report=skip_report,
            count_load_skips=training_args.process_index == 0,
            hub_arguments=data_args,
        )
    columns = train_dataset.column_names  # None for a stream whose first example is not read yet
    if model_args.use_image_ids and columns is not None and "image_id" not in columns:
        parser.error(f"--use_image_ids needs an image_id column; the {data_args.source} source has {columns}")

    steps_per_epoch = optimizer_steps_per_epoch(train_dataset, training_args)
    try:
        resume_checkpoint = checkpoint_to_resume(training_args)
    except CheckpointError as error:
        raise SystemExit(f"error: {error}") from error
    if model_args.model_name_or_path:  # a saved pretraining run: its weights, momentum, queues and tokenizer
        model = BlipForPreTraining.from_pretrained(model_args.model_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    else:
        if model_args.vocab_file:
            tokenizer = build_tokenizer(vocab_file=model_args.vocab_file)
        elif model_args.text_model_name_or_path:  # BERT's vocabulary, [DEC] and [ENC] added
            tokenizer = blip_tokenizer_for(model_args.text_model_name_or_path)
        else:
            # Learnt once for every rank (or read back from the checkpoint a resumed run continues). A pass over the
            # captions for the vocabulary is not an epoch. On the synthetic benchmark it covers the words of every
            # task, so that fine-tuning a VQA or NLVR2 head from this run does not meet its questions in pieces.
            def corpus() -> list[str]:
                captions = list(train_dataset["caption"])
                return captions + benchmark_texts(data_args.synthetic_seed) if source == "synthetic" else captions

            with skip_report.not_counting():
                tokenizer = run_vocabulary(corpus, model_args.vocab_size, training_args, resume_checkpoint)
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
        start_from_pretrained_encoders(model, model_args, training_args)
    apply_vision_arguments(model, model_args, training_args)

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
        max_words=model_args.max_words,
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
    apply_optimization_arguments(trainer, optimization_args, steps_per_epoch)
    try:
        trainer.train(resume_from_checkpoint=resume_checkpoint)
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


def apply_vision_arguments(model, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Stochastic depth and the checkpointed ViT blocks, set on the config that the ViT reads at every call, so they
    hold for a fresh model and a loaded one alike."""
    vision_config = model.config.vision_config
    if model_args.drop_path_rate is not None:
        vision_config.drop_path_rate = model_args.drop_path_rate
    if model_args.vision_gradient_checkpointing_layers is not None:
        vision_config.gradient_checkpointing_layers = model_args.vision_gradient_checkpointing_layers
        if not training_args.gradient_checkpointing:  # Trainer would enable it on the whole model
            model.vision_model.activation_checkpointing_enable()


def start_from_pretrained_encoders(model, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """The paper's start: the ViT from ImageNet weights, the text side from BERT; the report saved beside the run."""
    vision, text = model_args.vision_model_name_or_path, model_args.text_model_name_or_path
    if vision is None and text is None:
        return
    try:
        report = load_pretrained_encoders(model, vision=vision, text=text)
    except PretrainedSourceError as error:
        raise SystemExit(f"error: {error}") from error
    if report.missing:  # e.g. a 12-layer BERT for a model of another depth: say so rather than train half-random
        raise SystemExit(
            f"error: the pretrained encoders do not fill the {model_args.model_size} model:\n{report.summary()}"
        )
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "pretrained_encoders_report.json"), "w") as file:
            json.dump(report.to_dict(), file, indent=1)


if __name__ == "__main__":
    main()
