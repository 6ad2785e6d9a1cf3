"""Fault injection: checkpoints killed with SIGKILL while they are written, checkpoints with each file removed or
damaged, and exports raced by a second run or shrunk by a re-export. Nothing half-written is ever read as whole.

The SIGKILL tests fork a child that trains the tiny pretraining run of `test_pretraining_trainer` and kills itself
at a chosen point of its second save; forked, it needs no second import of torch and transformers. Every run here
uses one thread, so that the child, the resumed run and the uninterrupted one sum in the same order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint, sort_checkpoints

from transformers_blip import atomic_writes
from transformers_blip.atomic_writes import atomic_directory, atomic_file, is_partial, write_text_atomically
from transformers_blip.benchmark import build_synthetic_benchmark, export_benchmark
from transformers_blip.benchmark import export as benchmark_export
from transformers_blip.training import checkpoint_cli, checkpoints
from transformers_blip.training.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    allow_resume_without_path,
    latest_complete_checkpoint,
    staging_path,
    verify_checkpoint,
)

TOTAL_STEPS, SAVE_STEPS = 6, 2
BENCHMARK_SCRIPT = Path(__file__).parents[1] / "training_scripts" / "make_synthetic_benchmark.py"


def make_run(output_dir, max_steps: int = TOTAL_STEPS, **overrides):
    from test_pretraining_trainer import make_trainer  # the tiny model, data and settings of the resume test

    settings = {"save_steps": SAVE_STEPS, "save_total_limit": 1, **overrides}
    return make_trainer(output_dir, max_steps=max_steps, **settings)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in actual.items():  # weights, momentum copies, queues, pointer
        assert (tensor.float() - expected[name].float()).abs().max() <= 1e-6, name


# ---- the child: dies at one point of its second save (step 4) ----------------------------------------------------


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(point: str) -> None:
    """Patch the save so that the process kills itself at `point` of its second checkpoint."""
    calls = {"count": 0}

    def second_call() -> bool:
        calls["count"] += 1
        return calls["count"] == 2

    if point == "writing_weights":  # half of model.safetensors on disk
        import transformers.modeling_utils as modeling_utils

        save_file = modeling_utils.safe_save_file

        def half_written(tensors, filename, metadata=None):
            save_file(tensors, filename, metadata=metadata)
            if second_call():
                with open(filename, "r+b") as handle:
                    handle.truncate(os.path.getsize(filename) // 2)
                _die()

        modeling_utils.safe_save_file = half_written
    elif point == "before_seal":  # every file written, no manifest yet
        seal = checkpoints.write_manifest
        checkpoints.write_manifest = lambda directory: _die() if second_call() else seal(directory)
    elif point == "before_rename":  # sealed, still under its staging name
        publish = checkpoints.publish_directory
        checkpoints.publish_directory = lambda *a, **k: _die() if second_call() else publish(*a, **k)
    elif point == "deleting_old":  # checkpoint-4 in place, checkpoint-2 half deleted by save_total_limit
        rmtree = shutil.rmtree

        def half_deleted(path, *args, **kwargs):
            if is_partial(path) and "deleted" in Path(path).name:
                next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
                _die()
            rmtree(path, *args, **kwargs)

        atomic_writes.shutil.rmtree = half_deleted
    else:
        raise ValueError(f"unknown kill point {point!r}")


def run_child_until_killed(output_dir: Path, point: str) -> int:
    """Fork a child that trains in `output_dir` and dies at `point`; returns the signal that ended it."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            _kill_at(point)
            make_run(output_dir).train()
        finally:
            os._exit(1)  # the kill point was never reached, or training failed
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted_weights(tmp_path_factory):
    trainer = make_run(tmp_path_factory.mktemp("straight"), save_strategy="no")
    trainer.train()
    return weights(trainer)


@pytest.mark.parametrize(
    ("point", "newest_complete"),
    [("writing_weights", 2), ("before_seal", 2), ("before_rename", 2), ("deleting_old", 4)],
)
def test_a_save_killed_midway_leaves_no_partial_checkpoint_and_resume_continues_exactly(
    tmp_path, uninterrupted_weights, point, newest_complete
):
    run_dir = tmp_path / "run"
    assert run_child_until_killed(run_dir, point) == signal.SIGKILL

    visible = sort_checkpoints(str(run_dir))
    assert visible == [str(run_dir / f"checkpoint-{newest_complete}")]  # what a kill left is hidden
    for path in visible:
        verify_checkpoint(path)
    assert get_last_checkpoint(str(run_dir)) == visible[-1]
    assert any(is_partial(path) for path in run_dir.iterdir())  # the killed work, under a temporary name

    resumed = make_run(run_dir)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == TOTAL_STEPS
    assert_same_weights(weights(resumed), uninterrupted_weights)
    assert not any(is_partial(path) for path in run_dir.iterdir())  # the next save cleared them
    assert sort_checkpoints(str(run_dir)) == [str(run_dir / f"checkpoint-{TOTAL_STEPS}")]


# ---- checkpoints with a file removed or damaged ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory):
    """A run directory holding checkpoint-2 and checkpoint-4, both sealed."""
    run_dir = tmp_path_factory.mktemp("sealed") / "run"
    make_run(run_dir, max_steps=4, save_total_limit=None).train()
    return run_dir


@pytest.fixture
def run_copy(sealed_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(sealed_run, copy)
    return copy


def checkpoint_files(checkpoint: Path) -> list[str]:
    return sorted(json.loads((checkpoint / MANIFEST_NAME).read_text())["files"])


def zero_tail(path: Path) -> None:
    """Overwrite the second half of `path` with zeros, keeping its size (a torn write's usual trace)."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 2)
        handle.write(bytes(size - size // 2))


def test_the_manifest_lists_every_file_trainer_resumes_from(sealed_run):
    files = checkpoint_files(sealed_run / "checkpoint-4")
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert name in files


@pytest.mark.parametrize("damage", ["removed", "zeroed_tail", "truncated"])
def test_each_removed_or_damaged_file_is_named_and_the_previous_checkpoint_is_picked(run_copy, damage):
    checkpoint = run_copy / "checkpoint-4"
    for name in checkpoint_files(checkpoint):
        path = checkpoint / name
        saved = path.read_bytes()
        if damage == "removed":
            path.unlink()
        elif damage == "zeroed_tail":
            zero_tail(path)
        else:
            path.write_bytes(saved[: len(saved) // 2])
        with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
            verify_checkpoint(checkpoint)
        assert latest_complete_checkpoint(run_copy) == str(run_copy / "checkpoint-2")
        path.write_bytes(saved)
    verify_checkpoint(checkpoint)


@pytest.mark.parametrize(("name", "damage"), [("optimizer.pt", "removed"), ("model.safetensors", "zeroed_tail")])
def test_resume_refuses_a_damaged_checkpoint_naming_the_file(run_copy, name, damage):
    path = run_copy / "checkpoint-4" / name
    path.unlink() if damage == "removed" else zero_tail(path)
    trainer = make_run(run_copy)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        trainer.train(resume_from_checkpoint=str(path.parent))
    assert trainer.state.global_step == 0  # refused before anything was loaded or trained


def test_the_best_checkpoint_is_verified_before_it_is_reloaded(run_copy):
    zero_tail(run_copy / "checkpoint-2" / "model.safetensors")
    trainer = make_run(run_copy)
    trainer.state.best_model_checkpoint = str(run_copy / "checkpoint-2")  # as load_best_model_at_end would find it
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        trainer._load_best_model()


def test_a_damaged_manifest_and_a_missing_directory_are_refused(run_copy):
    for text in ('{"format": 1, "files": [', '{"format": 1, "files": {"trainer_state.json": {"size": 3}}}', "[]"):
        (run_copy / "checkpoint-4" / MANIFEST_NAME).write_text(text)
        with pytest.raises(CheckpointError, match="checkpoint_manifest.json is damaged"):
            verify_checkpoint(run_copy / "checkpoint-4")
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        verify_checkpoint(run_copy / "checkpoint-99")
    with pytest.raises(CheckpointError, match="no checkpoint-N directory"):
        latest_complete_checkpoint(run_copy / "empty")


def test_a_checkpoint_without_a_manifest_is_refused_until_sealed(run_copy, capsys):
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        (run_copy / checkpoint / MANIFEST_NAME).unlink()  # as a plain Trainer writes them
    with pytest.raises(CheckpointError, match=f"has no {MANIFEST_NAME}.*seal"):
        verify_checkpoint(run_copy / "checkpoint-4")
    with pytest.raises(CheckpointError, match="no complete checkpoint") as refused:
        latest_complete_checkpoint(run_copy)
    assert "checkpoint-2" in str(refused.value) and "checkpoint-4" in str(refused.value)

    assert checkpoint_cli.main(["seal", str(run_copy / "checkpoint-2")]) == 0
    assert latest_complete_checkpoint(run_copy) == str(run_copy / "checkpoint-2")
    assert checkpoint_cli.main(["verify", str(run_copy / "checkpoint-4")]) == 1
    assert MANIFEST_NAME in capsys.readouterr().out


def test_temporary_directories_are_never_taken_for_checkpoints(run_copy):
    staging = staging_path(run_copy / "checkpoint-6")
    shutil.copytree(run_copy / "checkpoint-4", staging)  # a complete-looking save, killed before its rename
    assert get_last_checkpoint(str(run_copy)) == str(run_copy / "checkpoint-4")
    assert str(staging) not in sort_checkpoints(str(run_copy))
    assert latest_complete_checkpoint(run_copy) == str(run_copy / "checkpoint-4")


def test_a_bare_resume_flag_means_the_newest_complete_checkpoint():
    parser = HfArgumentParser(TrainingArguments)
    allow_resume_without_path(parser)
    (bare,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--resume_from_checkpoint"])
    (given,) = parser.parse_args_into_dataclasses(["--output_dir", "out", "--resume_from_checkpoint", "out/c-2"])
    assert bare.resume_from_checkpoint is True and given.resume_from_checkpoint == "out/c-2"


# ---- atomic files and directories --------------------------------------------------------------------------------


def test_an_interrupted_file_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomically(tmp_path / "captions.json", "old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as handle:
        handle.write("new, half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["captions.json"]


def test_a_directory_appears_whole_and_a_non_empty_target_is_refused_unless_overwritten(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("first")
        assert not target.exists()
    with pytest.raises(FileExistsError, match=str(target)), atomic_directory(target):
        pass
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(os.listdir(target)) == ["b.txt"] and os.listdir(tmp_path) == ["out"]


# ---- exports: a concurrent run, a smaller re-export ----------------------------------------------------------------


def tiny_benchmark(seed: int, num_web: int = 8):
    return build_synthetic_benchmark(
        seed=seed, image_size=16, num_human=3, num_web=num_web, num_val=2, num_test=2, num_vqa=3, num_nlvr=2
    )


def shard_members(directory: Path) -> dict[str, bytes]:
    """Every member of every webdataset shard under `directory`, by shard prefix and member name."""
    members = {}
    for shard in sorted(directory.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                members[f"{shard.name.split('-')[0]}/{member.name}"] = tar.extractfile(member).read()
    return members


def tree(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def two_benchmarks(tmp_path_factory):
    """Two different benchmarks and the export of each alone, to compare raced exports against."""
    references = tmp_path_factory.mktemp("references")
    benchmarks = {seed: tiny_benchmark(seed) for seed in (1, 2)}
    for seed, benchmark in benchmarks.items():
        export_benchmark(benchmark, references / str(seed), shard_size=3)
    return benchmarks, {seed: references / str(seed) for seed in benchmarks}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_export_raced_by_another_run_never_mixes_the_two(tmp_path, monkeypatch, two_benchmarks, overwrite):
    benchmarks, references = two_benchmarks
    target = tmp_path / "export"
    export_nlvr = benchmark_export.export_nlvr

    def racing_nlvr(benchmark, output_dir):  # the second run starts and finishes while the first is half done
        monkeypatch.setattr(benchmark_export, "export_nlvr", export_nlvr)
        export_benchmark(benchmarks[2], target, shard_size=3, overwrite=overwrite)
        return export_nlvr(benchmark, output_dir)

    monkeypatch.setattr(benchmark_export, "export_nlvr", racing_nlvr)
    if overwrite:  # the later run replaces the earlier one whole
        export_benchmark(benchmarks[1], target, shard_size=3, overwrite=True)
        assert tree(target) == tree(references[1])
    else:  # the run that finishes second is refused, and says where
        with pytest.raises(FileExistsError, match=str(target)):
            export_benchmark(benchmarks[1], target, shard_size=3)
        assert tree(target) == tree(references[2])
    assert os.listdir(tmp_path) == ["export"]  # no temporary directory left behind


def test_a_smaller_re_export_leaves_no_old_shards(tmp_path, two_benchmarks):
    benchmarks, references = two_benchmarks
    target = tmp_path / "export"
    export_benchmark(benchmarks[1], target, shard_size=3)
    shards_before = sorted((target / "webdataset").glob("*.tar"))
    with pytest.raises(FileExistsError, match="overwrite"):
        export_benchmark(tiny_benchmark(1, num_web=2), target, shard_size=3)
    assert sorted((target / "webdataset").glob("*.tar")) == shards_before  # refused before anything was written

    export_benchmark(tiny_benchmark(1, num_web=2), target, shard_size=3, overwrite=True)
    web_shards = sorted(path.name for path in (target / "webdataset").glob("web-*.tar"))
    assert len(shards_before) > len(list((target / "webdataset").glob("*.tar")))
    assert web_shards == ["web-00000.tar"]  # 2 web pairs: one shard, none of the earlier three


def test_two_script_runs_into_one_directory_leave_one_whole_run(tmp_path, two_benchmarks):
    _, references = two_benchmarks
    sizes = [
        "--image_size", "16", "--num_human", "3", "--num_web", "8", "--num_val", "2", "--num_test", "2",
        "--num_vqa", "3", "--num_nlvr", "2", "--num_proc", "1",
    ]  # fmt: skip
    export_dir = tmp_path / "export"
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(BENCHMARK_SCRIPT),
                "--seed",
                str(seed),
                *sizes,
                "--output_dir",
                str(tmp_path / "dataset"),
                "--export_dir",
                str(export_dir),
                "--export_formats",
                "webdataset",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in (1, 2)
    ]
    results = [(run.wait(timeout=240), run.stderr.read()) for run in runs]
    failed = [stderr for code, stderr in results if code != 0]
    assert len(failed) == 1, results
    assert "is not empty" in failed[0] and "Traceback" not in failed[0]

    winner = 1 if results[0][0] == 0 else 2
    assert shard_members(export_dir) == shard_members(references[winner] / "webdataset")  # its shards, and only
    assert os.listdir(export_dir) == ["webdataset"]
    assert sorted(os.listdir(tmp_path)) == ["dataset", "export"]
