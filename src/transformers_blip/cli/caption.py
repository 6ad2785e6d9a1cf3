"""`blip caption`: caption image files, folders, lists of paths, parquet files and webdataset shards, resumably.

blip caption photos/ --recursive --model Salesforce/blip-image-captioning-base --output captions.jsonl
blip caption a.jpg b.png list.txt --model ./my-captioner --sidecar .txt --skip-existing
blip caption shards/{00000..00009}.tar --model ./my-captioner --output captions.jsonl --score-with ./retrieval
blip caption --dataset-name my_images --split test --image-column img --model ./my-captioner --output captions.jsonl
"""

from __future__ import annotations

import argparse

from ..image_processing_blip import DEFAULT_MAX_PIXELS
from .common import (
    DTYPES,
    CommandError,
    add_device_options,
    add_model_options,
    load_model,
    placed,
    report_failures,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption image files, folders, lists of paths, parquet files and webdataset shards",
        description="Caption images in batches; resumable (a restarted run skips what its output already holds).",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        help="image files, folders, .txt files listing image paths, .parquet files, webdataset .tar shards",
    )
    parser.add_argument(
        "--dataset-name",
        help="a datasets dataset too: a hub id, a folder in the hub's layout, or a save_to_disk folder",
    )
    parser.add_argument("--dataset-config-name", help="the dataset's configuration")
    parser.add_argument("--split", default="train", help="the dataset's split to caption (default train)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading it")
    add_model_options(parser)
    parser.add_argument("--recursive", action="store_true", help="also caption the images in subfolders")
    parser.add_argument(
        "--image-column", default="image", help="the column of parquet files or the dataset holding the images"
    )
    parser.add_argument("--output", help="a JSON-lines file: one {image, caption} per line, appended to")
    parser.add_argument("--sidecar", help="write each caption beside its image with this suffix, e.g. .txt")
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose sidecar file exists")
    parser.add_argument("--prompt", default="", help='a prefix the caption continues, e.g. "a picture of "')
    parser.add_argument("--num-beams", type=int, default=3, help="beam search width (default 3, as BLIP)")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (default 0.9)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="(default 1.0; BLIP's CapFilt uses 1.1 when sampling)"
    )
    parser.add_argument("--min-length", type=int, default=5, help="fewest tokens per caption (default 5)")
    parser.add_argument("--max-length", type=int, default=20, help="most tokens per caption (default 20)")
    parser.add_argument("--num-captions", type=int, default=1, help="captions per image (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument(
        "--score-with",
        metavar="M2",
        help="a retrieval model: add each caption's ITM match probability to the JSON-lines record (itm_score)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument(
        "--num-workers", type=int, default=2, help="DataLoader workers that decode the images (default 2)"
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images (decompression bombs) (default {DEFAULT_MAX_PIXELS})",
    )
    add_device_options(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def _check_options(args: argparse.Namespace) -> None:
    if not args.inputs and not args.dataset_name:
        raise CommandError("nothing to caption: give image files, folders, lists, shards or --dataset-name")
    if args.dataset_name and args.output is None:
        raise CommandError("a dataset's rows have no file to put a sidecar beside: give --output FILE.jsonl")
    if args.streaming and not args.dataset_name:
        raise CommandError("--streaming streams a --dataset-name; none was given")
    if args.output is None and args.sidecar is None:
        raise CommandError("nowhere to write the captions: give --output FILE.jsonl, --sidecar .txt, or both")
    if args.sidecar is not None and not args.sidecar.startswith("."):
        raise CommandError(f"--sidecar takes a suffix that starts with a dot, such as .txt, not {args.sidecar!r}")
    if args.score_with is not None and args.output is None:
        raise CommandError("--score-with writes the scores into the JSON-lines file: give --output FILE.jsonl")
    for option in ("num_captions", "batch_size", "num_beams", "max_length", "max_pixels"):
        if getattr(args, option) < 1:
            raise CommandError(f"--{option.replace('_', '-')} must be at least 1, not {getattr(args, option)}")
    if args.num_workers < 0 or args.min_length < 0:
        raise CommandError("--num-workers and --min-length cannot be negative")
    if args.min_length > args.max_length:
        raise CommandError(f"--min-length {args.min_length} is more than --max-length {args.max_length}")
    if not 0 < args.top_p <= 1:
        raise CommandError(f"--top-p must be in (0, 1], not {args.top_p}")


def _dataset_images(args: argparse.Namespace):
    """The images of `--split` of `--dataset-name`, or a `CommandError` naming the split or column it lacks."""
    from ..data.hub_datasets import HubDatasetArguments, load_hub_splits
    from ..image_inputs import DatasetImages

    arguments = HubDatasetArguments(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_split=args.split,
        image_column=args.image_column,
        streaming=args.streaming,
    )
    try:
        images = load_hub_splits(arguments, "images")["train"]
    except (ValueError, OSError) as error:  # the library names the scripts' flags; this command spells its own
        message = str(error).replace("--train_split", "--split").replace("--image_column", "--image-column")
        raise CommandError(message) from error
    return DatasetImages(f"{args.dataset_name}[{args.split}]", images)


def run(args: argparse.Namespace) -> int:
    from ..batch_captioning import CaptionRun, CaptionSettings, caption_images, collect_images
    from ..image_inputs import is_container

    _check_options(args)
    captions = CaptionRun()
    paths = collect_images(args.inputs, args.recursive, captions)
    if args.dataset_name:
        paths.append(_dataset_images(args))
    report_failures("caption", captions.failed)
    reported = len(captions.failed)
    if args.output is None and any(is_container(path) for path in paths):
        raise CommandError("parquet files and tar shards have no file to put a sidecar beside: give --output")
    if paths:
        model, processor = load_model(args.model, "captioning", args.vocab_file)
        scorer = load_model(args.score_with, "retrieval") if args.score_with else None
        placed(model, args)
        settings = CaptionSettings(
            prompt=args.prompt,
            num_beams=args.num_beams,
            do_sample=args.sample,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            min_length=args.min_length,
            max_length=args.max_length,
            num_captions=args.num_captions,
            seed=args.seed,
        )
        caption_images(
            model,
            processor,
            paths,
            settings,
            output=args.output,
            sidecar=args.sidecar,
            skip_existing=args.skip_existing,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            dtype=DTYPES[args.dtype],
            run=captions,
            progress=not args.quiet,
            scorer=scorer,
            image_column=args.image_column,
            max_pixels=args.max_pixels,
        )
    report_failures("caption", captions.failed[reported:])
    where = " and ".join(str(target) for target in (args.output, args.sidecar and f"*{args.sidecar}") if target)
    print(f"blip caption: {captions.summary()}" + (f" -> {where}" if captions.captioned else ""))
    return 1 if captions.failed else 0
