"""CapFilt: bootstrap a noisy web dataset with a captioner and a filter, then write a report of what was kept.

By default it reads the synthetic benchmark's noisy web split and, at the end, measures the filter against the
benchmark's hidden noise flags. The output directory holds parquet shards (`data-*.parquet`) that pretraining reads
directly (`pretrain.py --source parquet --train_files OUT/data-*.parquet`), the scores of every text, a manifest and
`report/index.html`. A run killed at any point resumes when started again with the same command. docs/capfilt.md
has the plan for CC3M / CC12M / LAION.

    # one process
    python training_scripts/capfilt.py --captioner outputs/caption --filter outputs/retrieval --output_dir out
    # webdataset shards on 8 GPUs: each rank takes its own tar shards
    accelerate launch --num_processes 8 training_scripts/capfilt.py --captioner Salesforce/blip-image-captioning-large
        --filter Salesforce/blip-itm-large-coco --source webdataset --files "cc12m/{00000..01242}.tar" --bf16 ...
    # the same with torchrun
    torchrun --nproc_per_node 8 training_scripts/capfilt.py ...
    # a datasets dataset in place of --source (a hub id, a folder in the hub's layout, a save_to_disk folder)
    python training_scripts/capfilt.py --captioner ... --filter ... --dataset_name my_pairs --caption_column text
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from transformers_blip.benchmark import build_synthetic_benchmark
from transformers_blip.capfilt import CapFiltSettings, bootstrap, dataset_shards, webdataset_shards
from transformers_blip.capfilt.report import write_report
from transformers_blip.cli.common import CommandError, load_model
from transformers_blip.data import HubDatasetArguments, SkipReport
from transformers_blip.data.hub_datasets import reads_hub_dataset
from transformers_blip.training import load_pretraining_pairs


@dataclass
class CapFiltArguments:
    captioner: str = field(
        metadata={"help": "A BlipForConditionalGeneration: our dir, transformers' layout, hub id, .pth."}
    )
    filter: str = field(metadata={"help": "A BlipForImageTextRetrieval: our dir, transformers' layout, hub id, .pth."})
    output_dir: str = field(default="outputs/capfilt", metadata={"help": "Where shards, manifest and report go."})
    vocab_file: str | None = field(default=None, metadata={"help": "bert-base-uncased's vocab.txt, for .pth models."})
    num_captions: int = field(default=1, metadata={"help": "Synthetic captions per image (the paper: 1)."})
    threshold: float = field(default=0.5, metadata={"help": "Drop a text whose ITM match probability is below it."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling's p."})
    beam_search: bool = field(default=False, metadata={"help": "Beam search (3 beams) instead of nucleus sampling."})
    seed: int = field(
        default=0, metadata={"help": "Global seed; each image's sampling seed derives from it and its key."}
    )
    output_format: str = field(default="parquet", metadata={"help": "parquet or webdataset data shards."})
    batch_size: int = field(default=16, metadata={"help": "Images per batch (does not change the output)."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding images."})
    bf16: bool = field(default=False, metadata={"help": "Run both models in bfloat16 (GPU)."})
    fp16: bool = field(default=False, metadata={"help": "Run both models in float16 (GPU)."})
    report_samples: int = field(default=8, metadata={"help": "Images shown in the report."})


@dataclass
class InputArguments(HubDatasetArguments):
    """The noisy pairs: a `--source` of the script's own, or a `datasets` dataset (`--dataset_name`)."""

    source: str = field(
        default="synthetic",
        metadata={
            "help": "synthetic (its web split), coco_karpathy, caption_json, image_folder, parquet, webdataset."
        },
    )
    files: list[str] = field(default_factory=list, metadata={"help": "Annotation files, a folder, parquet or tars."})
    image_root: str | None = field(default=None, metadata={"help": "Root of relative image paths in JSON files."})
    shard_size: int = field(default=1000, metadata={"help": "Rows per shard of a non-streaming source."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic benchmark."})
    synthetic_num_web: int = field(default=6000, metadata={"help": "Synthetic web images."})
    synthetic_noise_rate: float = field(default=0.4, metadata={"help": "Share of noisy synthetic web captions."})
    synthetic_image_size: int = field(default=64, metadata={"help": "Side of the synthetic images."})


def input_shards(args: InputArguments, report: SkipReport, count_load_skips: bool):
    """The input shards and, on the synthetic benchmark, its hidden noise flags by image key."""
    if reads_hub_dataset(args, args.source):  # its training split, read whole: shards need its length
        pairs, _ = load_pretraining_pairs("hub", report=report, count_load_skips=count_load_skips, hub_arguments=args)
        return dataset_shards(pairs, args.shard_size), None
    if args.source == "synthetic":
        web = build_synthetic_benchmark(
            seed=args.synthetic_seed, num_web=args.synthetic_num_web, noise_rate=args.synthetic_noise_rate,
            image_size=args.synthetic_image_size, num_human=1, num_val=1, num_test=1, num_vqa=3, num_nlvr=1,
        )["web"]  # fmt: skip
        noisy = dict(zip(map(str, web["image_id"]), web["is_noisy"]))
        return dataset_shards(web.select_columns(["image", "caption", "image_id"]), args.shard_size), noisy
    if args.source == "webdataset":
        return webdataset_shards(args.files), None
    pairs, _ = load_pretraining_pairs(
        args.source, args.files, args.image_root, report=report, count_load_skips=count_load_skips
    )
    return dataset_shards(pairs, args.shard_size), None


def main() -> int:
    args, input_args = HfArgumentParser((CapFiltArguments, InputArguments)).parse_args_into_dataclasses()
    state = PartialState(cpu=not torch.accelerator.is_available())  # joins torchrun's / accelerate's processes
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    settings = CapFiltSettings(
        num_captions=args.num_captions, decoding="beam" if args.beam_search else "nucleus", top_p=args.top_p,
        threshold=args.threshold, seed=args.seed, output_format=args.output_format,
    )  # fmt: skip
    report = SkipReport(log_dir=os.path.join(args.output_dir, "skipped-loading"))
    try:
        captioner, captioner_processor = load_model(args.captioner, "captioning", args.vocab_file)
        filter_model, filter_processor = load_model(args.filter, "retrieval", args.vocab_file)
        shards, noisy = input_shards(input_args, report, count_load_skips=state.is_main_process)
        summary = bootstrap(
            shards, captioner, captioner_processor, filter_model, filter_processor, args.output_dir, settings,
            batch_size=args.batch_size, num_workers=args.num_workers, device=state.device, dtype=dtype,
            model_names={"captioner": args.captioner, "filter": args.filter},
            progress=state.is_local_main_process,
        )  # fmt: skip
    except (CommandError, ValueError, FileNotFoundError) as error:
        print(f"capfilt: {error}", file=sys.stderr)
        return 2
    print(summary.text())
    if state.is_main_process:
        loading = f"while loading: {report.summary()}"
        page = write_report(
            args.output_dir, shards, num_samples=args.report_samples, noisy_keys=noisy, notes=[loading]
        )
        print(f"Manifest: {summary.manifest}. Report: {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
