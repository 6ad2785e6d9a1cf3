"""Checkpoints that are whole or invisible, and resumes that refuse damaged ones.

A checkpoint is written into a hidden staging directory beside `checkpoint-N`, sealed with a manifest of every
file's size and SHA-256 (`checkpoint_manifest.json`), and renamed to `checkpoint-N` only then. A resume verifies
the manifest first and refuses an incomplete or altered checkpoint, naming the file. `VerifiedCheckpointsMixin`
brings both to any `Trainer`:

    class MyTrainer(VerifiedCheckpointsMixin, Trainer): ...

A checkpoint without a manifest (written by a plain `Trainer`, or by a save that a kill interrupted) is refused
too; one known to be complete can be sealed by hand:

    python -m transformers_blip.training.checkpoint_cli seal outputs/run/checkpoint-500
    python -m transformers_blip.training.checkpoint_cli verify outputs/run/checkpoint-500
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from transformers import HfArgumentParser
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.utils import logging

from ..atomic_writes import is_partial, partial_path, publish_directory, remove_directory, write_text_atomically

logger = logging.get_logger(__name__)

MANIFEST_NAME = "checkpoint_manifest.json"
MANIFEST_FORMAT = 1
TRAINER_STATE_NAME = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, unsealed, incomplete or altered. The message names it."""


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _checkpoint_files(directory: Path) -> list[Path]:
    """Every file under `directory` but the manifest, as paths relative to it, in a stable order."""
    files = [path.relative_to(directory) for path in directory.rglob("*") if path.is_file()]
    return sorted(path for path in files if path.as_posix() != MANIFEST_NAME)


def write_manifest(directory: str | os.PathLike) -> Path:
    """Seal `directory`: record the size and SHA-256 of each of its files in `checkpoint_manifest.json`."""
    directory = Path(directory)
    files = {
        relative.as_posix(): {"size": (directory / relative).stat().st_size, "sha256": _sha256(directory / relative)}
        for relative in _checkpoint_files(directory)
    }
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    return write_text_atomically(directory / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def _read_manifest(directory: Path) -> dict[str, dict]:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {MANIFEST_NAME}: it was written by a Trainer that does not seal its checkpoints, or "
            f"its save was interrupted. If you know it is complete, seal it with `python -m "
            f"transformers_blip.training.checkpoint_cli seal {directory}` and resume again."
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
        for name, entry in files.items():
            if not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"no size or SHA-256 for {name}")
        return files
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); the checkpoint cannot be trusted") from error


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Raise `CheckpointError` naming the first file of `directory` that is missing, or whose size or SHA-256
    differs from its manifest; return quietly when every file is as sealed."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    files = _read_manifest(directory)
    if TRAINER_STATE_NAME not in files:
        raise CheckpointError(f"{directory} holds no {TRAINER_STATE_NAME}; it is not a Trainer checkpoint")
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(f"{path} has {size} bytes, {expected['size']} when the checkpoint was sealed")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} differs from the file sealed in the checkpoint (SHA-256 mismatch)")


def _checkpoint_step(path: Path) -> int | None:
    prefix = f"{PREFIX_CHECKPOINT_DIR}-"
    suffix = path.name.removeprefix(prefix)
    return int(suffix) if path.name.startswith(prefix) and suffix.isdigit() and path.is_dir() else None


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> str:
    """The `checkpoint-N` of `run_dir` with the highest N that verifies; newer ones that do not are logged and
    passed over. Raises `CheckpointError` when there is none."""
    run_dir = Path(run_dir)
    candidates = [path for path in run_dir.iterdir() if _checkpoint_step(path) is not None] if run_dir.is_dir() else []
    refused = []
    for path in sorted(candidates, key=_checkpoint_step, reverse=True):
        try:
            verify_checkpoint(path)
            return str(path)
        except CheckpointError as error:
            logger.warning(f"Passing over {path.name}: {error}")
            refused.append(str(error))
    if not refused:
        raise CheckpointError(f"no {PREFIX_CHECKPOINT_DIR}-N directory in {run_dir} to resume from")
    raise CheckpointError(f"no complete checkpoint in {run_dir}:\n  " + "\n  ".join(refused))


def staging_path(checkpoint_dir: str | os.PathLike) -> Path:
    """Where `checkpoint-N` is written before it is sealed. The same on every rank, so that all write into it."""
    return partial_path(checkpoint_dir, tag="saving")


def remove_interrupted_saves(run_dir: str | os.PathLike) -> None:
    """Delete what killed saves and deletions left in `run_dir` (hidden staging and doomed checkpoint folders)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if is_partial(path) and path.name.startswith(f".{PREFIX_CHECKPOINT_DIR}-"):
            shutil.rmtree(path, ignore_errors=True)


def rotate_checkpoints(run_dir: str | os.PathLike, save_total_limit: int | None, best_checkpoint: str | None) -> None:
    """Keep the newest `save_total_limit` checkpoints (and the best one), like Trainer, but delete each through
    `remove_directory`, so a kill during the deletion never leaves a half-deleted `checkpoint-N`."""
    if not save_total_limit or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(str(run_dir), use_mtime=True)  # oldest first
    protected = {checkpoints[-1]} if checkpoints else set()  # the newest, to resume from
    if best_checkpoint is not None:
        protected.add(str(Path(best_checkpoint)))
    excess = len(checkpoints) - max(save_total_limit, len(protected))
    for path in [path for path in checkpoints if path not in protected][: max(excess, 0)]:
        remove_directory(path)


class VerifiedCheckpointsMixin:
    """Mix into a `Trainer` subclass (before `Trainer`) for atomic, sealed checkpoints and verified resumes.

    - `_save_checkpoint` writes every rank's files into a hidden staging directory, seals it with a manifest, and
      renames it to `checkpoint-N`; `save_total_limit` rotation deletes old checkpoints the same all-or-nothing way.
    - `train(resume_from_checkpoint=path)` verifies the checkpoint first; `resume_from_checkpoint=True` picks the
      newest checkpoint of `output_dir` that verifies. Both raise `CheckpointError` naming the faulty file.
    - Loading a checkpoint (a resume, the best model at the end) does not warn about tied tensors: a checkpoint
      stores each shared tensor once, and loading it fills every name that shares it.
    """

    def _issue_warnings_after_load(self, load_result) -> None:
        model = self.accelerator.unwrap_model(self.model)
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial=trial)
        checkpoint_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staging_dir = str(staging_path(checkpoint_dir))
        if self.args.should_save:
            remove_interrupted_saves(run_dir)
        self.accelerator.wait_for_everyone()  # no rank writes into the staging directory before it is cleared
        self._write_checkpoint_files(trial, staging_dir, checkpoint_dir)
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states, shards) are in before the seal
        if self.args.should_save:
            write_manifest(staging_dir)
            publish_directory(staging_dir, checkpoint_dir, overwrite=True)
            if self.args.push_to_hub:
                self._push_from_checkpoint(checkpoint_dir)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()  # no rank goes on before the checkpoint is in place

    def _write_checkpoint_files(self, trial, staging_dir: str, checkpoint_dir: str) -> None:
        """What Trainer's own `_save_checkpoint` writes, written into `staging_dir`."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging_dir, _internal_call=True)
        if self.state.best_global_step:
            best_dir = os.path.join(
                os.path.dirname(checkpoint_dir), f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            )
            if best_dir == checkpoint_dir or os.path.exists(best_dir):  # this save is in place once sealed
                self.state.best_model_checkpoint = best_dir
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging_dir)
            self._save_scaler(staging_dir)
            self._save_rng_state(staging_dir)
        if self.args.should_save:
            self._record_callback_states()
            self.state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))

    def _record_callback_states(self) -> None:
        """Store the state of each stateful callback (and of `control`) in `self.state`, as Trainer does."""
        for callback in [*self.callback_handler.callbacks, self.control]:
            if not isinstance(callback, ExportableState):
                continue
            name = type(callback).__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(callback.state())
            else:
                self.state.stateful_callbacks[name] = callback.state()

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = latest_complete_checkpoint(self.args.output_dir)
            logger.info(f"Resuming from {resume_from_checkpoint}, the newest complete checkpoint")
        elif resume_from_checkpoint:
            verify_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial, **kwargs)

    def _load_best_model(self) -> None:
        if self.state.best_model_checkpoint is not None:
            verify_checkpoint(self.state.best_model_checkpoint)
        super()._load_best_model()


def checkpoint_to_resume(args) -> str | None:
    """The checkpoint a run's `--resume_from_checkpoint` names (`TrainingArguments`); given alone (True), the newest
    complete one of `output_dir`; None for a fresh run."""
    resume = args.resume_from_checkpoint
    if resume in (None, False, "False", ""):
        return None
    if resume is True or resume == "True":
        return latest_complete_checkpoint(args.output_dir)
    return resume


def allow_resume_without_path(parser: HfArgumentParser) -> None:
    """Let a script's `--resume_from_checkpoint` stand alone: alone it means the newest complete checkpoint."""
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.nargs, action.const = "?", True
            action.help = (action.help or "") + " Without a path: the newest complete checkpoint of output_dir."


__all__ = [
    "MANIFEST_NAME",
    "CheckpointError",
    "VerifiedCheckpointsMixin",
    "allow_resume_without_path",
    "checkpoint_to_resume",
    "latest_complete_checkpoint",
    "remove_interrupted_saves",
    "rotate_checkpoints",
    "staging_path",
    "verify_checkpoint",
    "write_manifest",
]
