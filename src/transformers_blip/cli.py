"""The `blip` command line: the jobs people run with BLIP.

    blip caption photos/ --recursive --model Salesforce/blip-image-captioning-base --output captions.jsonl
    blip caption a.jpg b.png list.txt --model ./my-captioner --sidecar .txt --skip-existing

`--model` is anything `from_pretrained` reads (a hub id, a directory of ours or in transformers' BLIP layout) or an
original Salesforce `.pth` file (with `--vocab_file`, bert-base-uncased's `vocab.txt`). Exit status: 0 when every
input was captioned (or already was), 1 when some input failed (each is named on its own line and counted in the
summary), 2 for a command that cannot run (a bad option, a model that is not a captioner).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CommandError(Exception):
    """A command that cannot run as given; its message is printed alone, without a traceback."""


def _caption_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="caption image files, folders and lists of paths",
        description="Caption images in batches; resumable (a restarted run skips what its output already holds).",
    )
    parser.add_argument("inputs", nargs="+", help="image files, folders, or .txt files listing image paths")
    parser.add_argument("--model", required=True, help="a hub id, a model directory, or an original .pth file")
    parser.add_argument("--vocab_file", help="bert-base-uncased's vocab.txt, for an original .pth model")
    parser.add_argument("--recursive", action="store_true", help="also caption the images in subfolders")
    parser.add_argument("--output", help="a JSON-lines file: one {image, caption} per line, appended to")
    parser.add_argument("--sidecar", help="write each caption beside its image with this suffix, e.g. .txt")
    parser.add_argument("--skip-existing", action="store_true", help="skip images whose sidecar file exists")
    parser.add_argument("--prompt", default="", help='a prefix the caption continues, e.g. "a picture of "')
    parser.add_argument("--num-beams", type=int, default=3, help="beam search width (default 3, as BLIP)")
    parser.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (default 0.9)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="(BLIP uses 1.1 when sampling)")
    parser.add_argument("--min-length", type=int, default=5, help="fewest tokens per caption (default 5)")
    parser.add_argument("--max-length", type=int, default=20, help="most tokens per caption (default 20)")
    parser.add_argument("--num-captions", type=int, default=1, help="captions per image (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers that decode the images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_caption)


def load_captioner(model: str, vocab_file: str | None = None):
    """`(model, processor)` for captioning from a hub id, a directory or an original `.pth` file."""
    from . import BlipForConditionalGeneration, BlipImageTextProcessor, build_processor, build_tokenizer

    if model.endswith(".pth"):
        from .convert.original import load_original_checkpoint

        if vocab_file is None:
            raise CommandError(f"{model}: an original checkpoint holds no tokenizer; pass --vocab_file vocab.txt")
        try:
            captioner, _ = load_original_checkpoint(model, head="captioning")
        except (ValueError, OSError) as error:
            raise CommandError(f"{model}: {error}") from None
        image_size = captioner.config.vision_config.image_size
        return captioner, build_processor(build_tokenizer(vocab_file=vocab_file), image_size=image_size)
    try:
        captioner, loading = BlipForConditionalGeneration.from_pretrained(model, output_loading_info=True)
        processor = BlipImageTextProcessor.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise CommandError(f"{model}: cannot load a BLIP captioner and its processor ({error})") from None
    architectures = captioner.config.architectures or []
    if loading["missing_keys"] or (architectures and not any("Generation" in name for name in architectures)):
        # A retrieval or VQA model loads into the captioning class with a random decoder: refuse it.
        saved_as = ", ".join(architectures) or "an unknown head"
        raise CommandError(
            f"{model} is not a captioner (it holds {saved_as}; {len(loading['missing_keys'])} tensors missing)"
        )
    return captioner, processor


def _run_caption(args: argparse.Namespace) -> int:
    from .batch_captioning import CaptionRun, CaptionSettings, caption_images, collect_images

    if args.output is None and args.sidecar is None:
        raise CommandError("nowhere to write the captions: give --output FILE.jsonl, --sidecar .txt, or both")
    if args.sidecar is not None and not args.sidecar.startswith("."):
        raise CommandError(f"--sidecar takes a suffix that starts with a dot, such as .txt, not {args.sidecar!r}")
    if args.num_captions < 1 or args.batch_size < 1:
        raise CommandError("--num-captions and --batch-size must be at least 1")
    run = CaptionRun()
    paths = collect_images(args.inputs, args.recursive, run)
    for source, reason in run.failed:
        print(f"blip caption: {source}: {reason}", file=sys.stderr)
    reported = len(run.failed)
    if paths:
        model, processor = load_captioner(args.model, args.vocab_file)
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
            run=run,
            progress=not args.quiet,
        )
    for source, reason in run.failed[reported:]:
        print(f"blip caption: {source}: {reason}", file=sys.stderr)
    where = " and ".join(str(target) for target in (args.output, args.sidecar and f"*{args.sidecar}") if target)
    print(f"blip caption: {run.summary()}" + (f" -> {where}" if run.captioned else ""))
    return 1 if run.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip", description="BLIP's jobs: caption images (more to come).")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _caption_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"blip {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["DTYPES", "build_parser", "load_captioner", "main"]
