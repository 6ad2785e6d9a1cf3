"""The paper's CapFilt ablation (its table 1) in miniature, on the synthetic benchmark.

For each seed: write the benchmark's human and noisy web pairs; pretrain a tiny model on human + web (the "noisy"
row); fine-tune it as a captioner and, separately, as a filter on the human split; bootstrap the web split three
ways (filter only, captioner only, captioner + filter); pretrain a new model from scratch on human + each
bootstrapped web set; fine-tune every pretraining the same way and score it on the held-out test split (retrieval
recall@1 both ways after ITM re-ranking, captioning CIDEr). The noisy pretraining's two fine-tunes are both its
evaluation and the captioner and filter of the bootstrapping.

Every step is one of the project's training scripts (or a data write) whose outputs go to their own directory; a
finished step leaves a record in `steps/`, so a run started again skips what is done and redoes only the step that
was cut short. The table of means and spreads over the seeds is written as `table.json` and `table.md`.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from datasets import Image as ImageFeature
from datasets import concatenate_datasets

from ..atomic_writes import atomic_file, write_text_atomically
from ..benchmark import build_synthetic_benchmark
from ..data import flatten_captions, load_parquet
from ..data.bootstrapped import capfilt_files

ROWS = ("noisy", "filter only", "captioner only", "captioner + filter")
# Each bootstrapped row: (synthetic captions per image, ITM threshold). A threshold of 0 keeps every text.
BOOTSTRAP_VARIANTS = {"filter only": (0, None), "captioner only": (1, 0.0), "captioner + filter": (1, None)}
# The table's columns: the key in the fine-tuning's metrics.json "test" scores, and the heading.
METRICS = {"txt_r1": "TR@1", "img_r1": "IR@1", "CIDEr": "CIDEr"}
PAIR_COLUMNS = ["image", "caption"]

StepRunner = Callable[[Path, list[str], Path], None]


@dataclass
class AblationSettings:
    """The sizes and lengths of every run of the ablation; the defaults are the full miniature run.

    Args:
        image_size: side of the benchmark's images and of every model's input.
        num_human, num_web, num_val, num_test: images of the benchmark's splits (5 captions per human image).
        noise_rate: share of the web split's captions that do not describe their image.
        pretrain_steps, pretrain_batch_size, pretrain_learning_rate: every pretraining (the noisy one and the three
            on bootstrapped data), from scratch.
        caption_epochs, retrieval_epochs: fine-tuning epochs over the human split, the same for every pretraining.
        finetune_batch_size: fine-tuning batch size.
        k_test: candidates that ITM re-ranks in retrieval evaluation.
        threshold: the filter's ITM match probability below which a text is dropped.
        capfilt_batch_size: images per bootstrapping batch (does not change its output).
    """

    image_size: int = 48
    num_human: int = 1000
    num_web: int = 2000
    num_val: int = 20
    num_test: int = 100
    noise_rate: float = 0.4
    pretrain_steps: int = 1500
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 1e-3
    caption_epochs: float = 2.0
    retrieval_epochs: float = 2.0
    finetune_batch_size: int = 32
    k_test: int = 16
    threshold: float = 0.5
    capfilt_batch_size: int = 32

    @classmethod
    def micro(cls) -> AblationSettings:
        """A run of a couple of minutes that goes through every step: for tests and a first look, not results."""
        return cls(
            image_size=32, num_human=16, num_web=24, num_val=4, num_test=8, pretrain_steps=4, pretrain_batch_size=8,
            caption_epochs=1, retrieval_epochs=1, finetune_batch_size=16, k_test=4, capfilt_batch_size=16,
        )  # fmt: skip


@dataclass
class Step:
    """One unit of work: a script run with `arguments` (or an in-process write, `write`) into `output`.

    `resumes_itself` marks a step whose script picks up its own partial output (CapFilt's finished shards); any
    other step's unfinished output is removed before it runs again.
    """

    name: str
    output: Path
    script: str | None = None
    arguments: list[str] = field(default_factory=list)
    write: Callable[[], None] | None = None
    resumes_itself: bool = False

    def signature(self) -> list[str]:
        """What the step's record must match for its output to count as done: the script and its arguments."""
        return [self.script or "write", *self.arguments]


# ---------------------------------------------------------------------------------------------------------------
# Running steps
# ---------------------------------------------------------------------------------------------------------------


def run_subprocess(script: Path, arguments: list[str], log: Path, threads: int | None = None) -> None:
    """Runs `script` in a fresh Python (as a user would), on `threads` torch threads if given, its output going to
    `log`; a failure raises with the end of that log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "w") as log_file:
        command = [sys.executable, str(script), *arguments]
        process = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
    if process.returncode != 0:
        raise RuntimeError(f"{script.name} exited with {process.returncode}; the end of {log}:\n{_tail(log)}")


def subprocess_runner(threads: int) -> StepRunner:
    """`run_subprocess` on `threads` torch threads: for seeds run side by side, each on its share of the cores."""
    return functools.partial(run_subprocess, threads=threads)


def run_in_process(script: Path, arguments: list[str], log: Path) -> None:
    """Runs `script` as `__main__` in this process with `arguments` as its command line (no interpreter start-up:
    for tests); its printed output is not captured, `log` only names the step. The process-wide switches a run
    may turn (`--full_determinism`'s deterministic algorithms and environment variables) are restored after it."""
    saved_argv, saved_environment = sys.argv, dict(os.environ)
    deterministic = torch.are_deterministic_algorithms_enabled()
    sys.argv = [str(script), *arguments]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"{script.name} ({log.stem}) exited with {exit_.code}") from exit_
    except Exception as error:  # what a subprocess would report as a traceback and a non-zero exit
        raise RuntimeError(f"{script.name} ({log.stem}) failed: {error}") from error
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environment)
        torch.use_deterministic_algorithms(deterministic)


def _tail(log: Path, characters: int = 3000) -> str:
    return log.read_text(errors="replace")[-characters:]


def _record_path(output_dir: Path, step: Step) -> Path:
    return output_dir / "steps" / f"{step.name.replace('/', '--')}.json"


def step_is_done(output_dir: Path, step: Step) -> bool:
    """Whether `step` finished with the same script and arguments as it has now."""
    record_path = _record_path(output_dir, step)
    if not record_path.exists():
        return False
    return json.loads(record_path.read_text())["command"] == step.signature()


def run_step(output_dir: Path, step: Step, scripts_dir: Path, runner: StepRunner, force: bool = False) -> bool:
    """Runs `step` unless its record says it is done (or `force`: an input of it was just made again); returns
    whether it ran. Its record (command, seconds, end time) is written only once its output is complete."""
    if not force and step_is_done(output_dir, step):
        return False
    record_path = _record_path(output_dir, step)
    redone = record_path.exists()  # done before, from other inputs: nothing of that output is reused
    if redone:
        record_path.unlink()
    if (redone or not step.resumes_itself) and step.output.exists():
        if step.output.is_dir():
            shutil.rmtree(step.output)
        else:
            step.output.unlink()
    print(f"[capfilt ablation] {step.name}", flush=True)
    start = time.perf_counter()
    if step.write is not None:
        step.write()
    else:
        runner(scripts_dir / step.script, step.arguments, output_dir / "logs" / f"{step.name.replace('/', '--')}.log")
    record = {"command": step.signature(), "seconds": round(time.perf_counter() - start, 2), "finished": time.time()}
    write_text_atomically(record_path, json.dumps(record, indent=1))
    return True


# ---------------------------------------------------------------------------------------------------------------
# The steps of one seed
# ---------------------------------------------------------------------------------------------------------------


def _flags(values: dict[str, Any]) -> list[str]:
    return [text for name, value in values.items() for text in (f"--{name}", str(value))]


def _benchmark(seed: int, settings: AblationSettings):
    return build_synthetic_benchmark(
        seed=seed, image_size=settings.image_size, num_human=settings.num_human, num_web=settings.num_web,
        num_val=1, num_test=1, num_vqa=3, num_nlvr=1, noise_rate=settings.noise_rate, num_proc=1,
    )  # fmt: skip


def _write_parquet(dataset, path: Path) -> None:
    with atomic_file(path) as handle:
        dataset.to_parquet(handle)


def write_benchmark_pairs(seed: int, settings: AblationSettings, data_dir: Path) -> None:
    """The benchmark's human pairs (one row per caption) and web pairs as `human.parquet` and `web.parquet`, and
    both together as `pairs-noisy.parquet`, the noisy pretraining's data. The web file carries `image_id` (the
    bootstrapping's image key) and the hidden `is_noisy` flag."""
    benchmark = _benchmark(seed, settings)
    undecoded = ImageFeature(decode=False)
    human = flatten_captions(benchmark["human"]).select_columns(PAIR_COLUMNS).cast_column("image", undecoded)
    web = benchmark["web"].select_columns([*PAIR_COLUMNS, "image_id", "is_noisy"]).cast_column("image", undecoded)
    _write_parquet(web, data_dir / "web.parquet")
    _write_parquet(concatenate_datasets([human, web.select_columns(PAIR_COLUMNS)]), data_dir / "pairs-noisy.parquet")
    _write_parquet(human, data_dir / "human.parquet")  # last: its presence says the directory is complete


def write_bootstrapped_pairs(capfilt_dir: Path, human_file: Path, target: Path) -> None:
    """The human pairs followed by the pairs a CapFilt run kept, as one parquet file to pretrain on (the human pairs
    alone where the filter kept nothing)."""
    human = load_parquet_pairs(human_file)
    kept = kept_pairs(capfilt_dir)
    pairs = human if kept is None else concatenate_datasets([human, kept.cast(human.features)])
    _write_parquet(pairs, target)


def kept_pairs(capfilt_dir: Path):
    """The image and caption of every record a finished CapFilt run kept, or `None` if it kept none. Shards whose
    every text was dropped are empty files, which the parquet reader refuses: they are left out."""
    files = [path for path in capfilt_files(capfilt_dir, "data") if pq.ParquetFile(path).metadata.num_rows > 0]
    return load_parquet(files).select_columns(PAIR_COLUMNS) if files else None


def load_parquet_pairs(path: Path):
    """The image and caption columns of a parquet file written by this module, images left undecoded."""
    from datasets import Dataset

    return Dataset.from_parquet(str(path)).cast_column("image", ImageFeature(decode=False))


def _row_slug(row: str) -> str:
    return row.replace(" + ", "-and-").replace(" ", "-")


def seed_steps(seed: int, settings: AblationSettings, seed_dir: Path) -> list[Step]:
    """Every step of one seed, in an order in which each step's inputs come before it."""
    data_dir = seed_dir / "data"
    benchmark = {"synthetic_seed": seed, "image_size": settings.image_size}
    finetune_data = {
        **benchmark, "synthetic_num_human": settings.num_human, "synthetic_num_val": settings.num_val,
        "synthetic_num_test": settings.num_test,
    }  # fmt: skip
    # Fine-tuning evaluates once, on the test split, at the end: per-epoch validation would cost more than it
    # teaches at these sizes, and every pretraining is fine-tuned for the same epochs. Every run is seeded and
    # deterministic (`--full_determinism`), so that a second run of a row gives its numbers again and the spread
    # over seeds is the seeds' alone. The device is each script's default: a GPU where there is one.
    finetune_common = {
        "per_device_train_batch_size": settings.finetune_batch_size, "eval_strategy": "no", "save_strategy": "no",
        "load_best_model_at_end": "false", "dataloader_num_workers": 0, "disable_tqdm": "true", "seed": seed,
        "full_determinism": "true",
    }  # fmt: skip

    def pretraining(row: str, pairs_file: Path) -> Step:
        arguments = _flags({
            "output_dir": seed_dir / "pretrain" / _row_slug(row), "model_size": "tiny", "source": "parquet",
            "train_files": pairs_file, "image_size": settings.image_size, "max_steps": settings.pretrain_steps,
            "per_device_train_batch_size": settings.pretrain_batch_size,
            "learning_rate": settings.pretrain_learning_rate, "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": min(50, settings.pretrain_steps // 10), "adam_beta2": 0.98, "min_crop_scale": 1.0,
            "randaugment": "false", "logging_steps": max(1, settings.pretrain_steps // 20), "save_strategy": "no",
            "disable_tqdm": "true", "seed": seed, "full_determinism": "true",
        })  # fmt: skip
        return Step(f"seed{seed}/pretrain/{_row_slug(row)}", seed_dir / "pretrain" / _row_slug(row), "pretrain.py",
                    arguments)  # fmt: skip

    def fine_tunes(row: str) -> list[Step]:
        pretrained = seed_dir / "pretrain" / _row_slug(row)
        caption_dir, retrieval_dir = seed_dir / "caption" / _row_slug(row), seed_dir / "retrieval" / _row_slug(row)
        caption = _flags({
            "output_dir": caption_dir, "model_name_or_path": pretrained, **finetune_data, **finetune_common,
            "num_train_epochs": settings.caption_epochs, "per_device_eval_batch_size": settings.finetune_batch_size,
        })  # fmt: skip
        retrieval = _flags({
            "output_dir": retrieval_dir, "pretraining_checkpoint": pretrained, **finetune_data, **finetune_common,
            "num_train_epochs": settings.retrieval_epochs, "k_test": settings.k_test,
        })  # fmt: skip
        return [
            Step(f"seed{seed}/caption/{_row_slug(row)}", caption_dir, "finetune_caption.py", caption),
            Step(f"seed{seed}/retrieval/{_row_slug(row)}", retrieval_dir, "finetune_retrieval.py", retrieval),
        ]

    benchmark_flags = _flags({
        **finetune_data, "synthetic_num_web": settings.num_web, "synthetic_noise_rate": settings.noise_rate
    })  # fmt: skip
    steps = [
        Step(
            f"seed{seed}/data",
            data_dir,
            None,
            benchmark_flags,
            lambda: write_benchmark_pairs(seed, settings, data_dir),
        )
    ]
    steps.append(pretraining("noisy", data_dir / "pairs-noisy.parquet"))
    steps += fine_tunes("noisy")  # the captioner and the filter of every bootstrapping, and the noisy row
    captioner, filter_dir = seed_dir / "caption" / "noisy", seed_dir / "retrieval" / "noisy"
    for row, (num_captions, threshold) in BOOTSTRAP_VARIANTS.items():
        capfilt_dir = seed_dir / "capfilt" / _row_slug(row)
        arguments = _flags({
            "captioner": captioner, "filter": filter_dir, "output_dir": capfilt_dir, "source": "parquet",
            "files": data_dir / "web.parquet", "num_captions": num_captions,
            "threshold": settings.threshold if threshold is None else threshold, "seed": seed,
            "batch_size": settings.capfilt_batch_size, "num_workers": 0, "report_samples": 4,
        })  # fmt: skip
        steps.append(Step(f"seed{seed}/capfilt/{_row_slug(row)}", capfilt_dir, "capfilt.py", arguments, None, True))
        pairs_file = data_dir / f"pairs-{_row_slug(row)}.parquet"
        steps.append(
            Step(
                f"seed{seed}/data/{_row_slug(row)}",
                pairs_file,
                None,
                [str(capfilt_dir), str(data_dir / "human.parquet")],
                write=lambda capfilt_dir=capfilt_dir, pairs_file=pairs_file: write_bootstrapped_pairs(
                    capfilt_dir, data_dir / "human.parquet", pairs_file
                ),
            )
        )  # fmt: skip
        steps.append(pretraining(row, pairs_file))
        steps += fine_tunes(row)
    return steps


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def seed_scores(seed_dir: Path) -> dict[str, dict[str, float]]:
    """Each row's test scores of one seed: recall@1 both ways and CIDEr (all in percent), from the fine-tunings'
    metrics.json."""
    scores = {}
    for row in ROWS:
        caption = json.loads((seed_dir / "caption" / _row_slug(row) / "metrics.json").read_text())["test"]
        retrieval = json.loads((seed_dir / "retrieval" / _row_slug(row) / "metrics.json").read_text())["test"]
        # CIDEr times 100, as the paper and the COCO leaderboards print it.
        scores[row] = {"txt_r1": retrieval["txt_r1"], "img_r1": retrieval["img_r1"], "CIDEr": 100 * caption["CIDEr"]}
    return scores


def kept_fractions(capfilt_dir: Path) -> dict[str, float]:
    """Share of the web and of the synthetic texts a CapFilt run kept, from its score files."""
    from . import iter_scores

    scored: dict[str, int] = {}
    kept: dict[str, int] = {}
    for score in iter_scores(capfilt_dir):
        scored[score["source"]] = scored.get(score["source"], 0) + 1
        kept[score["source"]] = kept.get(score["source"], 0) + int(score["kept"])
    return {source: kept[source] / scored[source] for source in sorted(scored)}


def summarize(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Each row's and metric's mean and sample standard deviation over the seeds (`None` with a single seed)."""
    table = {}
    for row in ROWS:
        table[row] = {}
        for metric in METRICS:
            values = [scores[row][metric] for scores in per_seed.values()]
            spread = statistics.stdev(values) if len(values) > 1 else None
            table[row][metric] = {"mean": statistics.fmean(values), "std": spread}
    return table


def table_markdown(table: dict, seeds: Sequence[int]) -> str:
    """The table as the paper's table 1 lays it out: one row per pretraining data, mean ± std over the seeds."""
    lines = [
        f"| pretraining web data | {' | '.join(METRICS.values())} |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for row in ROWS:
        cells = []
        for metric in METRICS:
            value = table[row][metric]
            cells.append(f"{value['mean']:.1f}" + (f" ± {value['std']:.1f}" if value["std"] is not None else ""))
        lines.append(f"| {row} | {' | '.join(cells)} |")
    seed_list = ", ".join(map(str, seeds))
    lines.append("")
    lines.append(
        f"Test split, after fine-tuning; TR@1 / IR@1: recall@1 (%) image-to-text / text-to-image, ITM re-ranked; "
        f"mean ± sample standard deviation over seeds {seed_list}."
    )
    return "\n".join(lines) + "\n"


def step_seconds(output_dir: Path) -> dict[str, float]:
    """Each finished step's seconds, by step name, from its record."""
    records = sorted((output_dir / "steps").glob("*.json"))
    return {path.stem.replace("--", "/"): json.loads(path.read_text())["seconds"] for path in records}


def run_ablation(
    output_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1),
    settings: AblationSettings | None = None,
    scripts_dir: str | os.PathLike | None = None,
    runner: StepRunner = run_subprocess,
    parallel_seeds: int = 1,
) -> dict[str, Any]:
    """Runs (or resumes) the ablation for every seed and writes `table.json` and `table.md` in `output_dir`.

    Args:
        output_dir: where every step's output, the step records (`steps/`), the logs and the table go.
        seeds: each seed draws its own benchmark and seeds every run of its steps.
        settings: sizes and lengths; default `AblationSettings()`, the full miniature run.
        scripts_dir: the folder of pretrain.py, finetune_caption.py, finetune_retrieval.py and capfilt.py;
            default the repository's `training_scripts`.
        runner: how a script step runs: `run_subprocess` (default), `subprocess_runner(threads)` or
            `run_in_process` (which runs one step at a time only: it sets this process's command line).
        parallel_seeds: seeds run side by side (a tiny model gains little from a second thread, so on 2 cores two
            seeds on one thread each finish sooner than one after the other on two).

    Returns:
        What `table.json` holds: the settings, the seeds, the table (row -> metric -> mean, std), each seed's
        scores, each bootstrapping's kept fractions, each step's seconds and which steps this call ran.
    """
    if not seeds:
        raise ValueError("the ablation needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {list(seeds)}")
    if parallel_seeds > 1 and runner is run_in_process:
        raise ValueError("run_in_process runs one step at a time: give parallel_seeds=1 or a subprocess runner")
    output_dir = Path(output_dir)
    settings = settings if settings is not None else AblationSettings()
    scripts_dir = (
        Path(scripts_dir) if scripts_dir is not None else Path(__file__).resolve().parents[3] / "training_scripts"
    )
    for script in ("pretrain.py", "finetune_caption.py", "finetune_retrieval.py", "capfilt.py"):
        if not (scripts_dir / script).is_file():
            raise FileNotFoundError(f"scripts_dir {scripts_dir} has no {script}")

    def run_seed(seed: int) -> list[str]:
        seed_dir = output_dir / f"seed{seed}"
        # Once a step of the seed runs, every later one runs too: it may read what that step just made again.
        ran: list[str] = []
        for step in seed_steps(seed, settings, seed_dir):
            if run_step(output_dir, step, scripts_dir, runner, force=bool(ran)):
                ran.append(step.name)
        return ran

    # Seeds share nothing but the output directory; side by side, each runs its steps in order. One at a time they
    # run in this thread (a script run in process may install signal handlers, which only the main thread can).
    side_by_side = max(1, min(parallel_seeds, len(seeds)))
    if side_by_side == 1:
        ran = [name for seed in seeds for name in run_seed(seed)]
    else:
        with ThreadPoolExecutor(max_workers=side_by_side) as pool:
            ran = [name for names in pool.map(run_seed, seeds) for name in names]
    per_seed = {seed: seed_scores(output_dir / f"seed{seed}") for seed in seeds}
    fractions = {
        seed: {
            row: kept_fractions(output_dir / f"seed{seed}" / "capfilt" / _row_slug(row)) for row in BOOTSTRAP_VARIANTS
        }
        for seed in seeds
    }
    table = summarize(per_seed)
    result = {
        "settings": asdict(settings),
        "seeds": list(seeds),
        "table": table,
        "per_seed": {str(seed): scores for seed, scores in per_seed.items()},
        "kept_fractions": {str(seed): value for seed, value in fractions.items()},
        "step_seconds": step_seconds(output_dir),
        "ran": ran,
    }
    write_text_atomically(output_dir / "table.json", json.dumps(result, indent=1))
    write_text_atomically(output_dir / "table.md", table_markdown(table, seeds))
    return result


__all__ = [
    "BOOTSTRAP_VARIANTS",
    "METRICS",
    "ROWS",
    "AblationSettings",
    "Step",
    "kept_fractions",
    "run_ablation",
    "run_in_process",
    "run_step",
    "run_subprocess",
    "subprocess_runner",
    "seed_scores",
    "seed_steps",
    "step_is_done",
    "summarize",
    "table_markdown",
    "write_benchmark_pairs",
    "write_bootstrapped_pairs",
]
