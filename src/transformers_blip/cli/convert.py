"""`blip convert`: checkpoints between the original `.pth` files, our layout and transformers' BLIP layout.

    blip convert model_base_caption_capfilt_large.pth ./blip-captioning --vocab_file vocab.txt
    blip convert model_base.pth ./blip-retrieval --head retrieval --image-size 384
    blip convert ./blip-captioning ./blip-captioning-hf --to transformers
    blip convert ./blip-captioning-hf ./blip-captioning-ours
    blip convert ./blip-captioning model_caption.pth --to original

The work is the convert package's (`load_original_checkpoint`, `save_original_conversion`, `save_model_directory`,
`save_original_checkpoint`); a model directory in either layout is read by `from_pretrained`. Outputs are written
under a temporary name and renamed into place, so a failed or killed conversion leaves nothing half written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .common import CommandError

TARGETS = ("ours", "transformers", "original")


def add_parser(subparsers) -> None:
    from ..convert.original import HEADS

    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints: original .pth <-> ours <-> transformers' BLIP layout",
        description="Convert an original .pth file or a model directory (ours or transformers' layout).",
    )
    parser.add_argument("source", help="an original .pth file, or a model directory in our or transformers' layout")
    parser.add_argument("output", help="the model directory to write, or the .pth file with --to original")
    parser.add_argument("--to", choices=TARGETS, default="ours", help="the layout to write (default ours)")
    parser.add_argument(
        "--head",
        default="auto",
        help=f"for a .pth: auto (from the checkpoint) or one of {', '.join(HEADS)}; pretraining checkpoints need one",
    )
    parser.add_argument("--image-size", type=int, help="for a .pth: the model's input size (ViT positions resized)")
    parser.add_argument(
        "--config", help="for a .pth: a config.json or model directory to use instead of inferring the config"
    )
    parser.add_argument(
        "--vocab_file", help="for a .pth: bert-base-uncased's vocab.txt, to write the processor beside the model"
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="write a .pth conversion even when tensors were dropped unexpectedly or are missing (random)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an output that exists")
    parser.set_defaults(run=run)


def _from_original(args: argparse.Namespace) -> Any:
    """Converts the `.pth` at `args.source` and writes it; returns the model."""
    from .. import BlipConfig
    from ..convert.original import load_original_checkpoint
    from ..convert.writing import save_original_conversion

    try:
        config = BlipConfig.from_pretrained(args.config) if args.config else None
        model, report = load_original_checkpoint(args.source, args.head, args.image_size, config)
    except (ValueError, OSError, NotImplementedError) as error:
        raise CommandError(f"{args.source}: {error}") from None
    print(report.summary())
    with _write_errors(args):
        save_original_conversion(
            model,
            report,
            args.output,
            vocab_file=args.vocab_file,
            allow_partial=args.allow_partial,
            transformers_layout=args.to == "transformers",
            overwrite=args.overwrite,
        )
    return model


def _from_directory(source: str) -> tuple[Any, Any]:
    from .. import BlipImageTextProcessor
    from ..convert.original import HEADS

    head_classes = {head_class.__name__: head_class for head_class in HEADS.values()}
    try:
        # The file itself: a transformers-layout config translated to ours keeps no `architectures`.
        raw_config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CommandError(f"{source}: not a BLIP model directory (config.json: {error})") from None
    architecture = (raw_config.get("architectures") or ["no architecture"])[0]
    if architecture not in head_classes:
        raise CommandError(f"{source}: {architecture} is not one of the heads {sorted(head_classes)}")
    try:
        model = head_classes[architecture].from_pretrained(source)
    except (OSError, ValueError) as error:
        raise CommandError(f"{source}: cannot load its weights ({error})") from None
    try:
        processor = BlipImageTextProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        processor = None  # a directory of weights alone converts to weights alone
    return model, processor


def _write(model: Any, processor: Any, args: argparse.Namespace) -> None:
    from ..atomic_writes import atomic_file
    from ..convert.original import save_original_checkpoint
    from ..convert.writing import save_model_directory

    if args.to == "original":
        if Path(args.output).exists() and not args.overwrite:
            raise CommandError(f"{args.output} exists; pass --overwrite to replace it")
        with atomic_file(args.output, "wb") as handle:
            save_original_checkpoint(model, handle)  # torch.save writes to an open file as to a path
        return
    with _write_errors(args):
        save_model_directory(model, args.output, processor, None, args.to == "transformers", args.overwrite)


@contextlib.contextmanager
def _write_errors(args: argparse.Namespace) -> Iterator[None]:
    """What refuses a model directory's write, as the command's error."""
    from ..convert.writing import IncompleteConversionError

    try:
        yield
    except IncompleteConversionError as error:
        raise CommandError(
            f"{args.source}: {error} (--allow-partial writes it with the missing ones random)"
        ) from None
    except FileExistsError as error:
        raise CommandError(f"{error} (--overwrite)") from None
    except ValueError as error:  # the vocabulary, or a head transformers' BLIP has no counterpart of
        raise CommandError(f"{args.source}: {error}") from None


def run(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.exists():
        raise CommandError(f"{args.source}: no such file or folder")
    if source.is_file() and args.to == "original":
        raise CommandError(f"{args.source} is an original checkpoint already; --to ours or --to transformers")
    if source.is_file():
        model = _from_original(args)
    else:
        model, processor = _from_directory(args.source)
        _write(model, processor, args)
    print(f"blip convert: {type(model).__name__} -> {args.output} ({args.to} layout)")
    return 0
