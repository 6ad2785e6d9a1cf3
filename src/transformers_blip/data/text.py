"""Text cleaning as BLIP does it, and the left/right word swap that keeps text true under a horizontal flip."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# Word limits per task: 30 for pretraining and caption training and 40 for NLVR2 statements, as the original sets
# them; 35 for retrieval, matching its 35-token text limit; 50 for VQA questions (the functions' own default).
MAX_WORDS = {"pretrain": 30, "caption": 30, "retrieval": 35, "nlvr": 40, "vqa": 50}

# The characters the original removes; note that "," "'" "?" and "-" survive.
_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")

# Words that name a side of the image, and what they become in the mirror image.
_SIDE_SWAPS = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
_SIDE_WORD = re.compile(r"\b(" + "|".join(_SIDE_SWAPS) + r")\b", flags=re.IGNORECASE)


# What a BERT tokenizer drops as it cleans text: control and format characters (NUL, zero-width spaces, joiners,
# BOMs...) and U+FFFD. A caption made of these alone would pass as text and tokenise to [CLS] [SEP].
_INVISIBLE_CATEGORIES = ("Cc", "Cf")
_REPLACEMENT_CHARACTER = "\ufffd"


def _visible_text(text: str) -> str:
    """The text with every kind of whitespace (tab, CR, NBSP, ideographic space...) as a plain space, and without
    the characters a tokenizer drops."""
    if text.isprintable() and _REPLACEMENT_CHARACTER not in text:  # nearly every caption: no character to look at
        return text
    kept = []
    for character in text:
        if character.isspace():
            kept.append(" ")
        elif unicodedata.category(character) not in _INVISIBLE_CATEGORIES and character != _REPLACEMENT_CHARACTER:
            kept.append(character)
    return "".join(kept)


def _truncate_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption: str, max_words: int = 50) -> str:
    """Clean a caption the way BLIP does: lower case, punctuation to spaces, single spaces, at most `max_words`.

    Unlike the original, any whitespace counts as a space and invisible characters are removed first, so that a
    caption of tabs, no-break or zero-width spaces comes out empty rather than as text without words.
    """
    caption = _PUNCTUATION.sub(" ", _visible_text(caption).lower())
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    return _truncate_words(caption, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a VQA question the way BLIP does: lower case, punctuation removed (not spaced), at most `max_words`.

    Unlike the original we also collapse runs of whitespace, which it leaves in and which then become empty words,
    and remove invisible characters as `pre_caption` does.
    """
    question = _PUNCTUATION.sub("", _visible_text(question).lower())
    question = _SPACES.sub(" ", question).strip()
    return _truncate_words(question, max_words)


def mentions_sides(text: str) -> bool:
    """Whether the text says "left" or "right" (so a horizontal flip would make it false)."""
    return _SIDE_WORD.search(text) is not None


def _swap_match(match: re.Match) -> str:
    word = match.group(0)
    swapped = _SIDE_SWAPS[word.lower()]
    return swapped.capitalize() if word[0].isupper() else swapped


def swap_sides(text: str) -> str:
    """The text that describes the mirror image: "left" <-> "right", "leftmost" <-> "rightmost"."""
    return _SIDE_WORD.sub(_swap_match, text)


def swap_sides_all(texts: str | Sequence[str]) -> str | list[str]:
    """`swap_sides` over one text or a list of texts (e.g. a question and its answers)."""
    if isinstance(texts, str):
        return swap_sides(texts)
    return [swap_sides(text) for text in texts]


def any_mentions_sides(texts: str | Sequence[str]) -> bool:
    """`mentions_sides` over one text or a list of texts."""
    if isinstance(texts, str):
        return mentions_sides(texts)
    return any(mentions_sides(text) for text in texts)
