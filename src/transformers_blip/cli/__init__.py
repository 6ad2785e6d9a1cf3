"""The `blip` command line: the jobs people run with BLIP.

    blip caption photos/ --recursive --model Salesforce/blip-image-captioning-base --output captions.jsonl
    blip retrieve photos/ --model ./retrieval --index photos.safetensors --text "a dog on a beach" --rerank
    blip vqa photo.jpg --model ./vqa --question "what colour is the car?"
    blip convert model_base_caption_capfilt_large.pth ./blip-captioning --vocab_file vocab.txt
    blip serve --model ./captioner --vqa-model ./vqa --retrieval-model ./retrieval --index photos.safetensors

Each subcommand is a module of this package with `add_parser(subparsers)`, which registers its options and sets
`run`, a function of the parsed arguments returning the exit status; `SUBCOMMANDS` lists them, in the order
`blip --help` shows them. `--model` is anything `from_pretrained` reads (a hub id, a directory of ours or in
transformers' BLIP layout) or an original Salesforce `.pth` file (with `--vocab_file`, bert-base-uncased's
`vocab.txt`). Exit status: 0 when every input was handled, 1 when some input failed (each is named on its own line
and counted in the summary), 2 for a command that cannot run (a bad option, a model that does not do the job).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from .common import CommandError

# One module per subcommand, registered here and nowhere else.
SUBCOMMANDS = ("caption", "retrieve", "vqa", "convert", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip",
        description=(
            "BLIP's jobs: caption images, search them by text, answer questions, convert checkpoints, serve the web "
            "app."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `blip ARGV` (the process's arguments by default) and returns its exit status."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # from_pretrained's "Loading weights" bar too
    try:
        return args.run(args)
    except CommandError as error:
        print(f"blip {args.command}: {error}", file=sys.stderr)
        return 2


__all__ = ["SUBCOMMANDS", "CommandError", "build_parser", "main"]
