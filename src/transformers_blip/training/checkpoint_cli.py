"""Seal or verify a Trainer checkpoint from the command line (see `transformers_blip.training.checkpoints`).

python -m transformers_blip.training.checkpoint_cli seal outputs/run/checkpoint-500     # write its manifest
python -m transformers_blip.training.checkpoint_cli verify outputs/run/checkpoint-500   # exit status 1 if bad
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoints import CheckpointError, verify_checkpoint, write_manifest


def main(argv: list[str] | None = None) -> int:
    """`seal DIR` writes a checkpoint's manifest; `verify DIR` checks one (exit status 1 and the reason if bad)."""
    parser = argparse.ArgumentParser(
        prog="python -m transformers_blip.training.checkpoint_cli", description=main.__doc__
    )
    parser.add_argument("command", choices=("seal", "verify"))
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args(argv)
    if not args.checkpoint.is_dir():
        parser.error(f"no checkpoint directory at {args.checkpoint}")
    if args.command == "seal":
        print(f"sealed {write_manifest(args.checkpoint)}")
        return 0
    try:
        verify_checkpoint(args.checkpoint)
    except CheckpointError as error:
        print(f"error: {error}")
        return 1
    print(f"{args.checkpoint}: complete")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
