"""VQA v2 accuracy by the official evaluation's rules, and NLVR2 accuracy.

An answer is normalised as the official script normalises it: newlines and tabs become spaces; punctuation is
removed (or becomes a space where it joins two words); a period not followed by a digit is dropped; number words up
to ten become digits; articles go; a contraction written without its apostrophe gets it back ("dont" -> "don't").
The predicted answer is always normalised; the ten human answers get the punctuation step only, and only when
they disagree (the official script's choice, kept so that the numbers are comparable with published ones).

A prediction's accuracy is min(#humans that gave it / 3, 1), averaged over the ten leave-one-out subsets of nine
humans; the accuracy of a set is the mean over its questions, in percent.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset(["a", "an", "the"])
# Marks that are removed, or replaced by a space when they stand between two words with no space around them.
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official script removes at most this many such periods from an answer (a quirk of its call), kept for parity.
_MAX_PERIODS_REMOVED = 32

# Contractions with their apostrophes; each one written with any of its apostrophes left out is mapped back to it.
# The official table lists most but not all of these spellings; "i'm", "i've" and "i'd've" are not here because the
# official table spells them with a capital I, which never matches the lower-cased answer.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's "
    "something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll "
    "they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's "
    "where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all "
    "y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _without_apostrophes(word: str) -> set[str]:
    """Every spelling of `word` with one or more of its apostrophes left out."""
    spellings = {""}
    for character in word:
        spellings = {prefix + character for prefix in spellings} | (set(spellings) if character == "'" else set())
    return spellings - {word}


CONTRACTION_FIXES = {spelling: word for word in _CONTRACTIONS for spelling in _without_apostrophes(word)}


def _strip_punctuation(text: str) -> str:
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # A mark next to a space, or any mark in an answer with a number like "1,000", is removed; a mark that
        # joins two words ("black/white") becomes a space.
        if f"{mark} " in text or f" {mark}" in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _normalise_words(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(CONTRACTION_FIXES.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official VQA evaluation compares it."""
    return _normalise_words(_strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the humans' answers (ten in VQA v2)."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    predicted = normalize_answer(prediction)
    answers = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in human_answers]
    if len(set(answers)) > 1:
        answers = [_strip_punctuation(answer) for answer in answers]
    matches = [answer == predicted for answer in answers]
    total = sum(matches)
    # Leaving human i out, the others' matches are total - matches[i].
    return sum(min(1.0, (total - matched) / 3) for matched in matches) / len(answers)


def vqa_accuracy(
    predictions: Mapping[Hashable, str], human_answers: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """`{"accuracy": percent}` of `{question_id: answer}` against `{question_id: [human answers]}`.

    Every question of `human_answers` needs a prediction, as the evaluation server requires.
    """
    missing = [key for key in human_answers if key not in predictions]
    if missing:
        raise ValueError(f"no prediction for questions {missing[:5]} ({len(missing)} in all)")
    if not human_answers:
        raise ValueError("no questions to score")
    scores = [vqa_question_accuracy(predictions[key], answers) for key, answers in human_answers.items()]
    return {"accuracy": 100.0 * sum(scores) / len(scores)}


def nlvr_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """`{"accuracy": percent}` of true/false predictions (1 = the statement is true of the image pair)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no statements to score")
    correct = sum(int(prediction) == int(label) for prediction, label in zip(predictions, labels))
    return {"accuracy": 100.0 * correct / len(labels)}


__all__ = ["CONTRACTION_FIXES", "normalize_answer", "nlvr_accuracy", "vqa_accuracy", "vqa_question_accuracy"]
