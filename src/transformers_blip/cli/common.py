"""What the `blip` subcommands share: the error that ends a command without a traceback, model loading from any
source `--model` takes, and the device and dtype options."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# What each command needs, by the head names of convert.original.HEADS, and the saved architectures that serve it
# (a pretraining model holds the retrieval head's ITC and ITM modules under the same names).
TASK_ARCHITECTURES = {
    "captioning": ("BlipForConditionalGeneration",),
    "retrieval": ("BlipForImageTextRetrieval", "BlipForPreTraining"),
    "vqa": ("BlipForQuestionAnswering",),
}
TASK_NAMES = {"captioning": "a captioner", "retrieval": "a retrieval model", "vqa": "a VQA model"}


class CommandError(Exception):
    """A command that cannot run as given; its message is printed alone, without a traceback."""


def add_model_options(parser: argparse.ArgumentParser, flag: str = "--model", required: bool = True) -> None:
    parser.add_argument(
        flag,
        required=required,
        help="a hub id, a model directory (ours or transformers' BLIP layout), or an original .pth file",
    )
    if flag == "--model":
        parser.add_argument("--vocab_file", help="bert-base-uncased's vocab.txt, for an original .pth model")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the model runs: cpu, cuda, cuda:1, mps (default: cuda when there is one)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's precision (default fp32)")


def load_model(model: str, task: str, vocab_file: str | None = None) -> tuple[Any, Any]:
    """`(model, processor)` for `task` ("captioning", "retrieval" or "vqa") from a hub id, a directory or an
    original `.pth` file; a CommandError names the model when it cannot be loaded or does not serve `task`."""
    from .. import BlipImageTextProcessor, build_processor, build_tokenizer
    from ..convert.original import HEADS, without_transformers_load_report

    head_class = HEADS[task]
    if model.endswith(".pth"):
        from ..convert.original import load_original_checkpoint

        if vocab_file is None:
            raise CommandError(f"{model}: an original checkpoint holds no tokenizer; pass --vocab_file vocab.txt")
        try:
            loaded, _ = load_original_checkpoint(model, head=task)
        except (ValueError, OSError, NotImplementedError) as error:
            raise CommandError(f"{model}: {error}") from None
        image_size = loaded.config.vision_config.image_size
        return loaded, build_processor(build_tokenizer(vocab_file=vocab_file), image_size=image_size)
    try:
        # The missing tensors are what the check below reports, in one line; transformers' table would repeat it.
        with without_transformers_load_report():
            loaded, loading = head_class.from_pretrained(model, output_loading_info=True)
        processor = BlipImageTextProcessor.from_pretrained(model)
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(f"{model}: cannot load {TASK_NAMES[task]} and its processor ({error})") from None
    architectures = loaded.config.architectures or []
    if loading["missing_keys"] or (architectures and not set(architectures) & set(TASK_ARCHITECTURES[task])):
        # Another head loads into this class with random modules in place of the missing ones: refuse it.
        saved_as = ", ".join(architectures) or "an unknown head"
        raise CommandError(
            f"{model} is not {TASK_NAMES[task]} (it holds {saved_as}; {len(loading['missing_keys'])} tensors missing)"
        )
    return loaded, processor


def placed(model: Any, args: argparse.Namespace) -> Any:
    """`model` in eval mode on `--device` in `--dtype`; a CommandError for a device this machine lacks."""
    try:
        return model.to(device=args.device, dtype=DTYPES[args.dtype]).eval()
    except (RuntimeError, AssertionError, ValueError) as error:  # torch's errors for absent or unknown devices
        raise CommandError(f"--device {args.device}: {error}") from None


def report_failures(command: str, failed: list[tuple[str, str]]) -> None:
    """One line per failed input on stderr: `blip COMMAND: NAME: REASON`."""
    for name, reason in failed:
        print(f"blip {command}: {name}: {reason}", file=sys.stderr)


__all__ = [
    "DTYPES",
    "CommandError",
    "add_device_options",
    "add_model_options",
    "load_model",
    "placed",
    "report_failures",
]
