"""A run's own vocabulary: trained once by the main process and read by every rank, and read back on resume."""

import contextlib
from types import SimpleNamespace

import pytest

from transformers_blip.training.vocabulary import run_vocabulary

TEXTS = ["a red square", "a blue circle left of a green triangle", "two small squares"] * 5


def arguments(output_dir, process_index):
    return SimpleNamespace(
        output_dir=str(output_dir),
        process_index=process_index,
        main_process_first=lambda desc: contextlib.nullcontext(),
    )


def test_other_ranks_read_the_main_process_vocabulary(tmp_path):
    main = run_vocabulary(lambda: TEXTS, 200, arguments(tmp_path, 0))

    def must_not_train():
        raise AssertionError("only the main process trains the vocabulary")

    other = run_vocabulary(must_not_train, 200, arguments(tmp_path, 1))
    assert other.get_vocab() == main.get_vocab()
    assert (tmp_path / "vocabulary").is_dir()


def test_a_resumed_run_reads_its_checkpoints_vocabulary(tmp_path):
    saved = run_vocabulary(lambda: TEXTS, 200, arguments(tmp_path / "first", 0))
    saved.save_pretrained(tmp_path / "checkpoint-3")
    resumed = run_vocabulary(
        lambda: ["other words entirely"], 200, arguments(tmp_path / "second", 0), str(tmp_path / "checkpoint-3")
    )
    assert resumed.get_vocab() == saved.get_vocab()
    with pytest.raises(OSError):
        run_vocabulary(lambda: TEXTS, 200, None, str(tmp_path / "missing-checkpoint"))
