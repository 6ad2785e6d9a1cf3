"""Generate the synthetic benchmark, save it with `save_to_disk`, and optionally export it in the real formats.

    # the default benchmark (a few seconds on 2 cores)
    python training_scripts/make_synthetic_benchmark.py --output_dir outputs/synthetic
    # larger images, a noisier web split, and every real format beside it (COCO-Karpathy JSON, BLIP's pretraining
    # lists, image folders, parquet, webdataset shards, VQA and NLVR2 JSON)
    python training_scripts/make_synthetic_benchmark.py --output_dir outputs/synthetic96 --image_size 96 \\
        --noise_rate 0.6 --export_dir outputs/synthetic96_files --export_formats coco_karpathy parquet webdataset

Load it back with `datasets.load_from_disk(output_dir)`; docs/data.md describes the splits and columns.

Both directories appear whole when their writing is done (docs/guarantees.md): a non-empty `--output_dir` or
`--export_dir` is refused unless `--overwrite`, which replaces it.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from transformers_blip.atomic_writes import atomic_directory, is_empty_or_absent
from transformers_blip.benchmark import EXPORT_FORMATS, build_synthetic_benchmark, export_benchmark, save_sample_grid


@dataclass
class BenchmarkArguments:
    output_dir: str = field(default="outputs/synthetic", metadata={"help": "Where save_to_disk writes the benchmark."})
    seed: int = field(default=0, metadata={"help": "Everything in the benchmark follows from it."})
    image_size: int = field(default=64, metadata={"help": "Side of the square images, in pixels."})
    num_human: int = field(default=2000, metadata={"help": "Clean images with 5 captions each."})
    num_web: int = field(default=6000, metadata={"help": "Web images with one terse, possibly noisy caption."})
    num_val: int = field(default=200, metadata={"help": "Validation images (captioning and retrieval)."})
    num_test: int = field(default=500, metadata={"help": "Test images (captioning and retrieval)."})
    num_vqa: int = field(default=3000, metadata={"help": "VQA training questions (3 per image)."})
    num_nlvr: int = field(default=1500, metadata={"help": "NLVR2 training pairs (test splits get a quarter)."})
    noise_rate: float = field(default=0.4, metadata={"help": "Share of noisy web captions."})
    num_proc: int | None = field(default=None, metadata={"help": "Worker processes (default: all cores)."})
    export_dir: str | None = field(default=None, metadata={"help": "Also write the real formats here."})
    export_formats: list[str] = field(
        default_factory=lambda: list(EXPORT_FORMATS), metadata={"help": f"Formats to export: {EXPORT_FORMATS}."}
    )
    sample_grid: str | None = field(default=None, metadata={"help": "Also save a PNG grid of samples here."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace a non-empty output_dir or export_dir (refused otherwise)."}
    )


@contextmanager
def _clear_errors():
    """Turn a refused or failed write into a one-line error and a non-zero exit."""
    try:
        yield
    except (FileExistsError, NotADirectoryError) as error:
        raise SystemExit(f"error: {error}") from error


def main() -> None:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    for directory in (args.output_dir, args.export_dir):  # refuse before minutes of work, not after
        if directory and not args.overwrite and not is_empty_or_absent(directory):
            raise SystemExit(f"error: {directory} is not empty; pass --overwrite to replace it")
    start = time.perf_counter()
    benchmark = build_synthetic_benchmark(
        seed=args.seed,
        image_size=args.image_size,
        num_human=args.num_human,
        num_web=args.num_web,
        num_val=args.num_val,
        num_test=args.num_test,
        num_vqa=args.num_vqa,
        num_nlvr=args.num_nlvr,
        noise_rate=args.noise_rate,
        num_proc=args.num_proc,
    )
    print(f"Generated in {time.perf_counter() - start:.1f} s:")
    for name, split in benchmark.items():
        print(f"  {name:<11} {len(split):>6} rows  {', '.join(split.column_names)}")
    with _clear_errors(), atomic_directory(args.output_dir, overwrite=args.overwrite) as staging:
        benchmark.save_to_disk(str(staging))
    print(f"Saved to {args.output_dir}")
    if args.export_dir:
        with _clear_errors():
            written = export_benchmark(benchmark, args.export_dir, args.export_formats, overwrite=args.overwrite)
        for name, paths in written.items():
            print(f"  exported {name}: {len(paths)} files under {args.export_dir}")
    if args.sample_grid:
        save_sample_grid(benchmark, args.sample_grid)
        print(f"Sample grid: {args.sample_grid}")


if __name__ == "__main__":
    main()
