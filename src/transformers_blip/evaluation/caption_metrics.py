"""Caption metrics as the COCO caption evaluation computes them: BLEU-1..4, METEOR, ROUGE-L and CIDEr-D.

The scorers are pycocoevalcap's own (BLEU, ROUGE-L and CIDEr-D are pure Python there; METEOR runs its Java jar), so
the numbers are the ones papers report. What this module adds is the step before them, tokenisation, without Java:
pycocoevalcap tokenises with Stanford's PTBTokenizer (a Java program), lower-cased, then drops punctuation tokens.
`ptb_tokenize` does the same in Python, for the text captions are made of (words, contractions, hyphens, numbers,
quotes, brackets, sentence punctuation). Where Java is installed, `caption_scores` uses the Java tokenizer by default,
so scores stay exactly the reference's; on a machine without Java it uses `ptb_tokenize` and leaves METEOR out,
saying so in the log.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence

logger = logging.getLogger(__name__)

# The tokens pycocoevalcap drops after tokenising. The bracket names are upper case while the tokenizer runs with
# lower-casing on, so brackets survive as "-lrb-", "-rrb-", ... in the reference scores: kept that way here too.
DROPPED_TOKENS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
# Words the tokenizer splits in two although they hold no apostrophe.
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"), "wanna": ("wan", "na")}
# Abbreviations whose final period is part of the word (a period elsewhere ends a sentence and is a token).
_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr prof vs etc inc ltd co corp mt ft no".split())
_WHOLE_WORDS = frozenset(["'n'", "o'clock"])
_TIME_OF_DAY = re.compile(r"(\d[\d:]*)(am|pm)")
_CLITICS = ("n't", "'s", "'m", "'re", "'ve", "'ll", "'d")
# One raw token: a run of the same sentence mark, an ellipsis, a double dash, a bracket, a quote, or a word that
# may hold inner periods, hyphens, apostrophes, slashes, commas and colons between digits.
_RAW_TOKEN = re.compile(
    r"""\.\.\.+|--+|[!?]+|[()\[\]{}]|"|[;,:$%&#@*+=<>|~^]
      |(?:[^\s()\[\]{}"!?;,:$%&#@*+=<>|~^]|(?<=\d)[,:](?=\d))+""",
    re.VERBOSE,
)


def _split_clitics(word: str) -> list[str]:
    """`doesn't` -> `does n't`, `man's` -> `man 's`, `dogs'` -> `dogs '`, `'twas` -> `'t was`."""
    if word in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[word])
    if word in _WHOLE_WORDS:
        return [word]
    if word.startswith("y'") and len(word) > 2:
        return ["y'", *_split_clitics(word[2:])]
    if word.startswith("'em") and len(word) > 3:  # the tokenizer reads a leading 'em as "them"
        return ["'em", *_split_clitics(word[3:])]
    time = _TIME_OF_DAY.fullmatch(word)
    if time:
        return [time.group(1), time.group(2)]
    if word.endswith("/") and len(word) > 1:
        return [*_split_clitics(word[:-1]), "/"]
    if word.startswith("'") and len(word) > 1 and not word.endswith("'"):
        if word == "'tis" or word == "'twas":
            return ["'t", word[2:]]
        return ["`", *_split_clitics(word[1:])]
    for clitic in _CLITICS:
        if word.endswith(clitic) and len(word) > len(clitic):
            stem = word[: -len(clitic)]
            if clitic == "n't" and stem in ("ca", "wo", "ai"):
                return [stem, clitic]
            return [*_split_clitics(stem), clitic]
    if word.endswith("'") and len(word) > 1:
        return [*_split_clitics(word[:-1]), "'"]
    return [word]


def _split_period(word: str, last: bool) -> list[str]:
    """A word's final period is its own token unless the word is an abbreviation (`mr.`, `u.s.`, `p.m.`)."""
    if not word.endswith(".") or word == ".":
        return [word]
    stem = word[:-1]
    is_abbreviation = stem in _ABBREVIATIONS or ("." in stem and all(part.isalpha() for part in stem.split(".")))
    if is_abbreviation:
        # At the end of a line the tokenizer adds the sentence's period after the abbreviation's.
        return [word, "."] if last else [word]
    return [*_split_period(stem, last=False), "."]


def _quote(mark: str, opening: bool) -> str:
    if mark == '"':
        return "``" if opening else "''"
    return mark


def ptb_tokens(text: str) -> list[str]:
    """The tokens of Stanford's PTBTokenizer (`-lowerCase -preserveLines`, as pycocoevalcap runs it) for caption text.

    Brackets become `-lrb-`, `-rrb-`, ...; double quotes become ``` `` ``` and `''`; clitics split (`does n't`,
    `it 's`, `ca n't`, `can not`); hyphenated words, decimal numbers and numbers with thousands commas stay whole.
    """
    # A dash run is a token even between words ("theirs--they").
    raw = _RAW_TOKEN.findall(re.sub(r"--+", lambda match: f" {match.group(0)} ", text.replace("\n", " ").lower()))
    tokens: list[str] = []
    for index, token in enumerate(raw):
        if token in _BRACKETS:
            tokens.append(_BRACKETS[token])
        elif token == '"':
            opening = not tokens or tokens[-1] in ("``", "`", *_BRACKETS.values()) or index == 0
            tokens.append(_quote(token, opening))
        elif token[0].isalnum() or token[0] in "'.-_/":
            tokens += _word_tokens(token, last=index == len(raw) - 1)
        else:
            tokens.append(token)
    return tokens


def _word_tokens(word: str, last: bool) -> list[str]:
    tokens: list[str] = []
    for part in _split_period(word, last):
        tokens += _split_clitics(part) if part != "." else [part]
    return tokens


def ptb_tokenize(text: str) -> str:
    """`text` as pycocoevalcap scores it: PTB tokens joined by spaces, punctuation tokens dropped."""
    return " ".join(token for token in ptb_tokens(text) if token not in DROPPED_TOKENS)


def java_available() -> bool:
    return shutil.which("java") is not None


def tokenize_captions(
    captions: Mapping[Hashable, Sequence[str]], tokenizer: str = "auto"
) -> dict[Hashable, list[str]]:
    """Tokenise `{id: [caption, ...]}` for the scorers: with Java's PTBTokenizer (`"java"`), `ptb_tokenize`
    (`"python"`), or the first where Java is installed and the second elsewhere (`"auto"`)."""
    if tokenizer not in ("auto", "java", "python"):
        raise ValueError(f"tokenizer must be 'auto', 'java' or 'python', got {tokenizer!r}")
    if tokenizer == "java" or (tokenizer == "auto" and java_available()):
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": text} for text in texts] for key, texts in captions.items()})
    return {key: [ptb_tokenize(text) for text in texts] for key, texts in captions.items()}


def _checked_inputs(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    missing = [key for key in predictions if key not in references]
    if missing:
        raise ValueError(f"predictions for ids without references: {missing[:5]}")
    unpredicted = [key for key in references if key not in predictions]
    if unpredicted:
        raise ValueError(f"references for ids without a prediction: {unpredicted[:5]}")
    empty = [key for key, texts in references.items() if isinstance(texts, str) or len(texts) == 0]
    if empty:
        raise ValueError(f"references must be lists of at least one caption; not so for ids {empty[:5]}")
    if not predictions:
        raise ValueError("no predictions to score")
    return {key: [predictions[key]] for key in references}, {key: list(texts) for key, texts in references.items()}


def caption_scores(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    tokenizer: str = "auto",
    meteor: bool | None = None,
) -> dict[str, float]:
    """COCO caption metrics of one predicted caption per id against that id's references.

    Args:
        predictions: `{id: caption}`.
        references: `{id: [caption, ...]}`, the same ids.
        tokenizer: `"auto"` (Java's PTBTokenizer where Java is installed, `ptb_tokenize` otherwise), `"java"` or
            `"python"`.
        meteor: compute METEOR (needs Java). `None`: where Java is installed; `True` without Java raises.

    Returns:
        `{"Bleu_1", ..., "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}`, fractions as pycocoevalcap gives them (METEOR
        absent where it was not computed).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    predicted, referenced = _checked_inputs(predictions, references)
    if meteor is None:
        meteor = java_available()
        if not meteor:
            logger.warning("METEOR left out: it runs on Java, which is not installed here")
    elif meteor and not java_available():
        raise RuntimeError("METEOR runs on Java, which is not installed here; pass meteor=False")
    results = tokenize_captions(predicted, tokenizer)
    gts = tokenize_captions(referenced, tokenizer)
    bleu, _ = Bleu(4).compute_score(gts, results, verbose=0)
    scores = {f"Bleu_{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()  # a Java process, ended when the scorer is collected
        scores["METEOR"] = float(scorer.compute_score(gts, results)[0])
        del scorer
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, results)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, results)[0])
    return scores


__all__ = [
    "CAPTION_METRICS",
    "DROPPED_TOKENS",
    "caption_scores",
    "java_available",
    "ptb_tokenize",
    "ptb_tokens",
    "tokenize_captions",
]
