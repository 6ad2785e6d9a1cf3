"""Converts an original Salesforce BLIP checkpoint (`.pth`) into a model directory, or a model directory back.

Original -> ours (a directory that `from_pretrained` loads, plus `conversion_report.json`; with `--vocab_file`,
bert-base-uncased's `vocab.txt`, also the processor, so that pipelines work on the directory):

    python training_scripts/convert_original_checkpoint.py \
        --checkpoint model_base_caption_capfilt_large.pth --output blip-captioning-base --vocab_file vocab.txt
    python training_scripts/convert_original_checkpoint.py \
        --checkpoint model_base.pth --head retrieval --image_size 384 --output blip-retrieval-from-pretraining

Original -> transformers' own BLIP layout (what the hub's `Salesforce/blip-*` repos hold): add `--transformers_layout`.

Ours -> original (`{"model": state_dict}`, which the original code's `load_checkpoint` reads):

    python training_scripts/convert_original_checkpoint.py --to_original --checkpoint blip-captioning-base \
        --output model_caption.pth

What was dropped, resized or missing is printed and saved in the report; see docs/checkpoints.md. A conversion that
drops tensors unexpectedly or leaves some missing writes nothing and exits with status 1, unless `--allow_partial`
asks for the partial model; a checkpoint with NaN or Inf values, or a file that is not a checkpoint, exits with
status 1 and a message naming it. The output directory is written under a temporary name and renamed into place;
one that is not empty is replaced only with `--overwrite`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from transformers_blip import BlipConfig
from transformers_blip.convert.original import HEADS, load_original_checkpoint, save_original_checkpoint
from transformers_blip.convert.writing import IncompleteConversionError, save_original_conversion


@dataclass
class ConversionArguments:
    checkpoint: str = field(metadata={"help": "An original .pth file, or a model directory with --to_original."})
    output: str = field(metadata={"help": "The model directory to write, or the .pth file with --to_original."})
    head: str = field(
        default="auto",
        metadata={
            "help": f"auto (from the checkpoint) or one of {', '.join(HEADS)}; pretraining checkpoints need one."
        },
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Input size of the model; ViT position embeddings are resized to it."}
    )
    config: str | None = field(
        default=None, metadata={"help": "A config.json or model directory to use instead of inferring the config."}
    )
    vocab_file: str | None = field(
        default=None, metadata={"help": "A BERT vocab.txt (bert-base-uncased's): also save BLIP's processor."}
    )
    text_num_attention_heads: int | None = field(
        default=None, metadata={"help": "Attention heads of the text model, when they are not 64 wide."}
    )
    vision_num_attention_heads: int | None = field(
        default=None, metadata={"help": "Attention heads of the ViT, when they are not 64 wide."}
    )
    allow_partial: bool = field(
        default=False,
        metadata={"help": "Write the model even if tensors were dropped unexpectedly or are missing (random)."},
    )
    transformers_layout: bool = field(
        default=False, metadata={"help": "Write transformers' own BLIP layout instead of ours."}
    )
    to_original: bool = field(default=False, metadata={"help": "Convert a model directory into an original .pth."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an output directory that is not empty."})


def export_original(args: ConversionArguments) -> None:
    config = BlipConfig.from_pretrained(args.checkpoint)
    head_classes = {head_class.__name__: head_class for head_class in HEADS.values()}
    architecture = (config.architectures or ["?"])[0]
    if architecture not in head_classes:
        raise SystemExit(f"{args.checkpoint}: architecture {architecture} is not one of {sorted(head_classes)}")
    save_original_checkpoint(head_classes[architecture].from_pretrained(args.checkpoint), args.output)
    print(f"wrote {args.output}")


def import_original(args: ConversionArguments) -> None:
    config = BlipConfig.from_pretrained(args.config) if args.config else None
    model, report = load_original_checkpoint(
        args.checkpoint,
        args.head,
        args.image_size,
        config,
        text_num_attention_heads=args.text_num_attention_heads,
        vision_num_attention_heads=args.vision_num_attention_heads,
    )
    print(report.summary())
    try:
        save_original_conversion(
            model,
            report,
            args.output,
            vocab_file=args.vocab_file,
            allow_partial=args.allow_partial,
            transformers_layout=args.transformers_layout,
            overwrite=args.overwrite,
        )
    except IncompleteConversionError as error:
        raise SystemExit(
            f"error: {args.checkpoint}: {error}. Pass --allow_partial to write the model anyway, with the missing "
            "tensors initialised randomly."
        ) from None
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> None:
    (args,) = HfArgumentParser(ConversionArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.to_original:
            export_original(args)
        else:
            import_original(args)
    except (ValueError, NotImplementedError, OSError) as error:  # what we cannot convert: say why, without a traceback
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main()
