"""The CapFilt ablation's orchestration (transformers_blip.capfilt.ablation): every step of one seed at a toy size,
run in this process, writes the four-row table; a second call does no work; a step cut short, or whose inputs
changed, runs again and only it; bad arguments are refused before any work."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from transformers_blip.capfilt.ablation import (
    METRICS,
    ROWS,
    AblationSettings,
    Step,
    run_ablation,
    run_in_process,
    run_step,
    seed_steps,
    step_is_done,
    summarize,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "training_scripts"
# Smaller still than `micro()`: two optimizer steps per pretraining, a handful of images per split.
SETTINGS = dataclasses.replace(
    AblationSettings.micro(), pretrain_steps=2, num_human=8, num_web=8, num_val=2, num_test=4, k_test=2
)


class CountingRunner:
    """Runs steps in this process and remembers which scripts it ran."""

    def __init__(self):
        self.ran: list[str] = []

    def __call__(self, script: Path, arguments: list[str], log: Path) -> None:
        self.ran.append(log.stem)
        run_in_process(script, arguments, log)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory) -> tuple[Path, dict]:
    output_dir = tmp_path_factory.mktemp("ablation")
    return output_dir, run_ablation(output_dir, seeds=(0,), settings=SETTINGS, runner=run_in_process)


def test_every_step_runs_and_the_table_has_the_four_rows(ablation):
    output_dir, result = ablation
    steps = seed_steps(0, SETTINGS, output_dir / "seed0")
    assert result["ran"] == [step.name for step in steps]
    assert all(step_is_done(output_dir, step) for step in steps)
    written = json.loads((output_dir / "table.json").read_text())
    assert written["table"] == result["table"]
    assert list(written["table"]) == list(ROWS)
    for row in ROWS:
        for metric in METRICS:
            value = written["table"][row][metric]
            assert 0.0 <= value["mean"] <= 100.0, (row, metric, value)
            assert value["std"] is None  # one seed: no spread to report
    markdown = (output_dir / "table.md").read_text()
    assert all(f"| {row} |" in markdown for row in ROWS)
    assert all(heading in markdown for heading in METRICS.values())


def test_the_bootstrap_variants_keep_what_they_should(ablation):
    output_dir, result = ablation
    fractions = result["kept_fractions"]["0"]
    assert set(fractions["filter only"]) == {"web"}  # no synthetic caption was written
    assert fractions["captioner only"] == {"synthetic": 1.0, "web": 1.0}  # threshold 0: nothing dropped
    assert set(fractions["captioner + filter"]) == {"synthetic", "web"}
    assert all(0.0 <= share <= 1.0 for share in fractions["captioner + filter"].values())
    # The pretraining data: the human pairs followed by every kept text.
    import pyarrow.parquet as pq

    data_dir = output_dir / "seed0" / "data"
    human = pq.ParquetFile(data_dir / "human.parquet").metadata.num_rows
    assert human == 5 * SETTINGS.num_human
    rows = pq.ParquetFile(data_dir / "pairs-captioner-only.parquet").metadata.num_rows
    assert rows == human + 2 * SETTINGS.num_web
    noisy = pq.read_table(data_dir / "pairs-noisy.parquet", columns=["caption"]).column("caption").to_pylist()
    assert len(noisy) == human + SETTINGS.num_web


def test_a_second_call_does_no_work(ablation):
    output_dir, result = ablation
    records = {path.name: path.read_text() for path in (output_dir / "steps").glob("*.json")}
    runner = CountingRunner()
    again = run_ablation(output_dir, seeds=(0,), settings=SETTINGS, runner=runner)
    assert runner.ran == [] and again["ran"] == []
    assert {path.name: path.read_text() for path in (output_dir / "steps").glob("*.json")} == records
    assert again["table"] == result["table"]


def test_a_step_cut_short_runs_again_alone(ablation):
    output_dir, result = ablation
    last = seed_steps(0, SETTINGS, output_dir / "seed0")[-1]  # the last fine-tuning, killed before its record
    (output_dir / "steps" / "seed0--retrieval--captioner-and-filter.json").unlink()
    leftover = last.output / "half-written.bin"
    leftover.write_bytes(b"\0")
    runner = CountingRunner()
    again = run_ablation(output_dir, seeds=(0,), settings=SETTINGS, runner=runner)
    assert again["ran"] == [last.name]
    assert runner.ran == ["seed0--retrieval--captioner-and-filter"]
    assert not leftover.exists()  # its unfinished output was removed before the rerun
    assert set(again["table"]) == set(result["table"])


def test_a_step_whose_arguments_changed_runs_again_and_a_failed_one_leaves_no_record(tmp_path):
    writes = []

    def write():
        target.write_text(str(len(writes)))
        writes.append(1)

    target = tmp_path / "out.txt"
    step = Step("one", target, None, ["--size", "1"], write)
    assert run_step(tmp_path, step, SCRIPTS, run_in_process)
    assert not run_step(tmp_path, step, SCRIPTS, run_in_process)
    assert writes == [1]
    changed = dataclasses.replace(step, arguments=["--size", "2"])
    assert not step_is_done(tmp_path, changed)
    assert run_step(tmp_path, changed, SCRIPTS, run_in_process) and len(writes) == 2

    def broken():
        raise OSError("disk full")

    failing = Step("two", tmp_path / "two.txt", None, [], broken)
    with pytest.raises(OSError, match="disk full"):
        run_step(tmp_path, failing, SCRIPTS, run_in_process)
    assert not step_is_done(tmp_path, failing)


def test_a_script_that_fails_names_itself(tmp_path):
    step = Step("bad", tmp_path / "pretrain", "pretrain.py", ["--source", "no_such_source"])
    with pytest.raises(RuntimeError, match="pretrain.py"):
        run_step(tmp_path, step, SCRIPTS, run_in_process)
    assert not step_is_done(tmp_path, step)


def test_the_spread_is_the_sample_standard_deviation_over_seeds():
    per_seed = {
        seed: {row: {metric: value + offset for metric in METRICS} for offset, row in enumerate(ROWS)}
        for seed, value in ((0, 10.0), (1, 20.0))
    }
    table = summarize(per_seed)
    assert table["noisy"]["CIDEr"]["mean"] == pytest.approx(15.0)
    assert table["captioner + filter"]["txt_r1"]["mean"] == pytest.approx(18.0)
    assert table["noisy"]["img_r1"]["std"] == pytest.approx(math.sqrt(50.0))


@pytest.mark.parametrize(
    "seeds, scripts_dir, error",
    [((), SCRIPTS, "at least one seed"), ((0, 0), SCRIPTS, "seeds must differ"), ((0,), "nowhere", "pretrain.py")],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path, seeds, scripts_dir, error):
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        run_ablation(tmp_path / "out", seeds, SETTINGS, scripts_dir=tmp_path / scripts_dir, runner=run_in_process)
    assert not (tmp_path / "out").exists()


def test_seeds_side_by_side_need_a_runner_that_can_share_the_process(tmp_path):
    with pytest.raises(ValueError, match="one step at a time"):
        run_ablation(tmp_path / "out", (0, 1), SETTINGS, runner=run_in_process, parallel_seeds=2)
    assert not (tmp_path / "out").exists()
