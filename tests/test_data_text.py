"""Caption and question cleaning as BLIP does it, and the left/right swap used with horizontal flips."""

import pytest

from transformers_blip.data import MAX_WORDS, mentions_sides, pre_caption, pre_question, swap_sides


def test_pre_caption_lowercases_spaces_punctuation_and_collapses_whitespace():
    assert pre_caption("A Dog (running) on the beach!  #summer ~fun") == "a dog running on the beach summer fun"


def test_pre_caption_keeps_the_characters_the_original_keeps():
    # Commas, apostrophes, question marks and hyphens are not in BLIP's punctuation set.
    assert pre_caption("A man's hat, red-ish?") == "a man's hat, red-ish?"


def test_pre_caption_strips_trailing_newline_and_edges():
    assert pre_caption("  Two cats.\n") == "two cats"


def test_pre_caption_truncates_to_max_words():
    caption = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(caption, max_words=30).split() == [f"w{i}" for i in range(30)]
    assert len(pre_caption(caption).split()) == 50  # the default


def test_pre_caption_of_punctuation_only_is_empty():
    assert pre_caption("...!!!") == ""


def test_pre_question_removes_punctuation_without_spacing_and_keeps_question_mark():
    assert pre_question("What's the man's (left) hand holding?") == "what's the man's left hand holding?"
    assert pre_question("Is it e.g. red?") == "is it eg red?"


def test_pre_question_truncates():
    question = " ".join(["why"] * 60) + "?"
    assert len(pre_question(question, max_words=35).split()) == 35


def test_task_word_limits():
    assert MAX_WORDS == {"pretrain": 30, "caption": 30, "retrieval": 35, "nlvr": 40, "vqa": 50}


@pytest.mark.parametrize(
    "text, swapped",
    [
        ("a red circle on the left", "a red circle on the right"),
        ("a cup to the left of a plate, a fork on the right", "a cup to the right of a plate, a fork on the left"),
        ("the leftmost dog and the rightmost cat", "the rightmost dog and the leftmost cat"),
        ("Left hand", "Right hand"),
        ("a bright light, leftover food", "a bright light, leftover food"),  # no side words inside other words
    ],
)
def test_swap_sides(text, swapped):
    assert swap_sides(text) == swapped
    assert swap_sides(swap_sides(text)) == text


def test_mentions_sides():
    assert mentions_sides("a dog on the left")
    assert mentions_sides("the rightmost cup")
    assert not mentions_sides("a bright room with leftovers")
