"""Reproduce the paper's CapFilt ablation (table 1) in miniature on the synthetic benchmark.

Per seed: pretrain a tiny model on human + noisy web pairs; fine-tune it as a captioner and as a filter on the
human split; bootstrap the web split three ways (filter only, captioner only, captioner + filter); pretrain a new
model on human + each bootstrapped web set; fine-tune every pretraining alike and score it on the test split. The
table (recall@1 both ways after ITM re-ranking, CIDEr; mean and spread over the seeds) goes to OUTPUT/table.md and
OUTPUT/table.json. Started again with the same command, a killed run skips every finished step. docs/capfilt.md
says what each step takes.

    python training_scripts/reproduce_capfilt.py --output-dir outputs/capfilt_ablation --seeds 0 1
    # the seeds one after the other, each run on every core
    python training_scripts/reproduce_capfilt.py --parallel-seeds 1
    # every step at a toy size, in a few minutes: checks the pipeline, not the method
    python training_scripts/reproduce_capfilt.py --output-dir outputs/capfilt_micro --micro
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from transformers_blip.capfilt.ablation import AblationSettings, run_ablation, subprocess_runner

SCRIPTS = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/capfilt_ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one benchmark and run seed each")
    parser.add_argument("--micro", action="store_true", help="toy sizes: every step in a few minutes, no results")
    parser.add_argument("--parallel-seeds", type=int, default=2, help="seeds run side by side")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run; default: the cores shared among the seeds"
    )
    defaults = AblationSettings()
    for settings_field in dataclasses.fields(AblationSettings):  # every size and length can be changed
        parser.add_argument(
            "--" + settings_field.name.replace("_", "-"), type=type(getattr(defaults, settings_field.name)),
            default=None, help=f"default {getattr(defaults, settings_field.name)} (--micro: its own)",
        )  # fmt: skip
    args = parser.parse_args()
    settings = AblationSettings.micro() if args.micro else defaults
    overrides = {
        settings_field.name: getattr(args, settings_field.name)
        for settings_field in dataclasses.fields(AblationSettings)
        if getattr(args, settings_field.name) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    side_by_side = max(1, min(args.parallel_seeds, len(args.seeds)))
    threads = args.threads or max(1, (os.cpu_count() or 1) // side_by_side)
    result = run_ablation(
        args.output_dir, args.seeds, settings, scripts_dir=SCRIPTS, runner=subprocess_runner(threads),
        parallel_seeds=side_by_side,
    )  # fmt: skip
    with open(os.path.join(args.output_dir, "table.md")) as table:
        print(table.read())
    print(f"{len(result['ran'])} steps ran; the table is in {os.path.join(args.output_dir, 'table.json')}")


if __name__ == "__main__":
    main()
