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


_LEARN_VOCABULARY = """
import json, sys
from transformers_blip.processing_blip import build_tokenizer
corpus = [f"a {colour} {shape} left of a {other} {shape}s" for colour in ("red", "blue", "green", "teal")
          for shape in ("square", "circle", "triangle") for other in ("yellow", "purple", "greyish")]
corpus += ["an unusual word: supercalifragilistic", "squares, circles; triangles!"]
learnt = []
for vocab_size in (60, 400):
    tokenizer = build_tokenizer(corpus=corpus, vocab_size=vocab_size)
    learnt.append([tokenizer.get_vocab(), tokenizer.tokenize("a greyish supercalifragilistic octagon")])
print(json.dumps(learnt))
"""


def test_the_learnt_vocabulary_is_the_same_in_every_process():
    import json
    import subprocess
    import sys

    # Each process seeds its hash maps anew: a vocabulary that depended on their order would differ between runs.
    runs = [
        subprocess.run([sys.executable, "-c", _LEARN_VOCABULARY], capture_output=True, text=True) for _ in range(2)
    ]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr
    first, second = (json.loads(run.stdout) for run in runs)
    assert first == second
    (small_vocab, small_pieces), (large_vocab, large_pieces) = first
    for vocab, pieces in first:
        assert sorted(vocab, key=vocab.get)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        assert "[UNK]" not in pieces  # every character of the corpus is in the vocabulary: a new word is spelled
    # With room for every word each is one token; with 60, only the most frequent fit and the rest are spelled.
    assert large_pieces[:3] == ["a", "greyish", "supercalifragilistic"]
    assert "supercalifragilistic" not in small_vocab and small_pieces[2] == "s" and small_pieces[3].startswith("##")
