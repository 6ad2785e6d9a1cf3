"""The tokenizer of a run that trains its own vocabulary: the same on every rank, and the same after a resume.

A vocabulary is learnt once, by the main process, saved under the run's output directory and read by every rank, so
that no rank depends on reading the same texts as the main one; a resumed run reads the one its checkpoint saved,
which stays right when the data changed since.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments

from ..processing_blip import build_tokenizer


def shared_vocabulary(
    texts: Callable[[], Sequence[str]], vocab_size: int, training_args: TrainingArguments
) -> PreTrainedTokenizerBase:
    """BLIP's tokenizer with a vocabulary trained on `texts()` by the main process, read back by every process."""
    directory = os.path.join(training_args.output_dir, "vocabulary")
    with training_args.main_process_first(desc="training the vocabulary"):
        if training_args.process_index == 0:
            build_tokenizer(corpus=texts(), vocab_size=vocab_size).save_pretrained(directory)
        return AutoTokenizer.from_pretrained(directory)


def run_vocabulary(
    texts: Callable[[], Sequence[str]],
    vocab_size: int,
    training_args: TrainingArguments | None,
    resume_checkpoint: str | None = None,
) -> PreTrainedTokenizerBase:
    """The vocabulary a run trains for itself: its checkpoint's when it resumes, else `shared_vocabulary` (or, with
    no `training_args`, one process alone, trained here)."""
    if resume_checkpoint is not None:
        return AutoTokenizer.from_pretrained(resume_checkpoint)
    if training_args is None:
        return build_tokenizer(corpus=texts(), vocab_size=vocab_size)
    return shared_vocabulary(texts, vocab_size, training_args)


__all__ = ["run_vocabulary", "shared_vocabulary"]
