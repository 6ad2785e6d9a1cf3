"""Language about synthetic scenes: human captions, web alt-text (clean and noisy), VQA, NLVR2 statements.

The vocabulary is small (8 colours, 5 shapes, 2 sizes, 9 places, 4 textures, counts to four) and the grammar has a
handful of templates with synonyms, so a tiny model learns it in minutes. Human captions are complete and varied,
like COCO's five references; web captions are terse and often partial, and a chosen fraction is noisy in the ways
alt-text is noisy. Every text is already in `pre_caption` form (lower case, no removed punctuation), so cleaning
it again changes nothing.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

from .scenes import COLORS, COLUMNS, ROWS, SHAPES, Scene, SceneObject

MAX_CAPTION_WORDS = 30  # BLIP's pretraining limit; captions are built to fit it

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOR_WORDS = {color: (color,) for color in COLORS} | {"purple": ("purple", "violet")}
SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
TEXTURE_WORDS = {
    "plain": ("plain", "smooth"),
    "grainy": ("grainy", "noisy"),
    "striped": ("striped", "stripy"),
    "checkered": ("checkered", "checked"),
}

# ---------------------------------------------------------------------------------------------------------------
# Words and phrases
# ---------------------------------------------------------------------------------------------------------------


def plural(noun: str) -> str:
    """circle -> circles, box -> boxes, plus sign -> plus signs."""
    return noun + "es" if noun.endswith(("s", "x", "sh", "ch")) else noun + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def counted(count: int, noun: str) -> str:
    """'no circles', 'one circle', 'three circles'."""
    return f"{NUMBER_WORDS[count]} {noun if count == 1 else plural(noun)}"


def join_phrases(phrases: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def place_name(row: int, column: int) -> str:
    """The canonical name of a grid cell, as VQA answers use it: 'top left', 'top', 'left', 'center', ..."""
    if (row, column) == (1, 1):
        return "center"
    if row == 1:
        return COLUMNS[column]
    if column == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[column]}"


def place_phrase(obj: SceneObject, rng: random.Random) -> str:
    """Where an object is, in one of a few equivalent phrasings."""
    row, column = obj.row, obj.column
    if (row, column) == (1, 1):
        return rng.choice(("in the center", "in the middle"))
    if row == 1:
        return rng.choice((f"on the {COLUMNS[column]}", f"on the {COLUMNS[column]} side"))
    if column == 1:
        return rng.choice((f"at the {ROWS[row]}", f"near the {ROWS[row]}"))
    corner = place_name(row, column)
    return rng.choice((f"in the {corner} corner", f"at the {corner}"))


def object_noun(obj: SceneObject, rng: random.Random, size: bool = True) -> str:
    """'big red circle' (or without the size)."""
    words = [rng.choice(SIZE_WORDS[obj.size])] if size else []
    words += [rng.choice(COLOR_WORDS[obj.color]), rng.choice(SHAPE_WORDS[obj.shape])]
    return " ".join(words)


def object_phrase(obj: SceneObject, rng: random.Random, size: bool = True, place: bool = True) -> str:
    """'a big red circle in the top left corner'."""
    phrase = with_article(object_noun(obj, rng, size))
    return f"{phrase} {place_phrase(obj, rng)}" if place else phrase


def texture_phrase(scene: Scene, rng: random.Random) -> str:
    return f"on {with_article(rng.choice(TEXTURE_WORDS[scene.texture]))} background"


def word_count(text: str) -> int:
    return len(text.split())


def _fitting(build: Callable[[bool, bool], str]) -> str:
    """The most detailed version of a caption (sizes, places) that fits in `MAX_CAPTION_WORDS`."""
    for size, place in ((True, True), (False, True), (True, False), (False, False)):
        caption = build(size, place)
        if word_count(caption) <= MAX_CAPTION_WORDS:
            return caption
    return " ".join(caption.split()[:MAX_CAPTION_WORDS])


# ---------------------------------------------------------------------------------------------------------------
# Human captions: complete, varied, like COCO's references
# ---------------------------------------------------------------------------------------------------------------


def _listing(scene: Scene, rng: random.Random) -> str:
    objects = list(scene.objects)
    rng.shuffle(objects)  # people do not always describe in reading order
    return _fitting(lambda size, place: join_phrases([object_phrase(o, rng, size, place) for o in objects]))


def _there_is(scene: Scene, rng: random.Random) -> str:
    if len(scene.objects) > 1 and rng.random() < 0.5:
        opening = f"there are {NUMBER_WORDS[len(scene.objects)]} shapes,"
    else:
        opening = "there is"
    return _fitting(
        lambda size, place: f"{opening} " + join_phrases([object_phrase(o, rng, size, place) for o in scene.objects])
    )


def _image_of(scene: Scene, rng: random.Random) -> str:
    opening = rng.choice(("an image of", "a drawing of", "an illustration of", "a simple graphic of"))
    return _fitting(
        lambda size, place: (
            f"{opening} "
            + join_phrases([object_phrase(o, rng, size, place and len(scene.objects) <= 2) for o in scene.objects])
        )
    )


def _on_background(scene: Scene, rng: random.Random) -> str:
    return _fitting(
        lambda size, place: (
            join_phrases([object_phrase(o, rng, size, place) for o in scene.objects])
            + " "
            + texture_phrase(scene, rng)
        )
    )


def _relation_words(first: SceneObject, second: SceneObject, rng: random.Random) -> str:
    """How `first` lies relative to `second`, from whichever axis separates them."""
    if first.column != second.column and (first.row == second.row or rng.random() < 0.5):
        return "to the left of" if first.column < second.column else "to the right of"
    return "above" if first.row < second.row else "below"


def _relation(scene: Scene, rng: random.Random) -> str | None:
    if len(scene.objects) < 2:
        return None
    first, second = rng.sample(scene.objects, 2)
    others = [o for o in scene.objects if o is not first and o is not second]
    relation = _relation_words(first, second, rng)

    def build(size: bool, place: bool) -> str:
        caption = f"{object_phrase(first, rng, size, False)} {relation} {object_phrase(second, rng, size, False)}"
        if others:
            caption += ", with " + join_phrases([object_phrase(o, rng, size, place) for o in others])
        return caption

    return _fitting(build)


def _grouped_counts(scene: Scene, rng: random.Random) -> str:
    if rng.random() < 0.5:
        groups = Counter(o.shape for o in scene.objects)
        phrases = [counted(n, rng.choice(SHAPE_WORDS[shape])) for shape, n in sorted(groups.items())]
    else:
        groups = Counter(o.color for o in scene.objects)
        phrases = [counted(n, f"{color} shape") for color, n in sorted(groups.items())]
    return join_phrases(phrases) + " " + texture_phrase(scene, rng)


def _single(scene: Scene, rng: random.Random) -> str | None:
    if len(scene.objects) != 1:
        return None
    (obj,) = scene.objects
    opening = rng.choice(("a single", "just one", "only one"))
    return f"{opening} {object_noun(obj, rng)} {place_phrase(obj, rng)}"


_HUMAN_TEMPLATES = (_listing, _there_is, _image_of, _on_background, _relation, _grouped_counts, _single)


def human_captions(scene: Scene, rng: random.Random, num_captions: int = 5) -> list[str]:
    """`num_captions` distinct true captions of a scene, from different templates where possible."""
    captions: list[str] = []
    templates = list(_HUMAN_TEMPLATES)
    rng.shuffle(templates)
    for _attempt in range(12):  # enough rounds to find distinct phrasings even for a one-object scene
        for template in templates:
            caption = template(scene, rng)
            if caption is not None and caption not in captions:
                captions.append(caption)
            if len(captions) == num_captions:
                return captions
    raise RuntimeError(f"could not phrase {num_captions} distinct captions for {scene}")


# ---------------------------------------------------------------------------------------------------------------
# Web captions: terse alt-text, clean or noisy
# ---------------------------------------------------------------------------------------------------------------

NOISE_KINDS = ("mismatch", "wrong_attributes", "boilerplate", "keywords")

_WEB_SUFFIXES = ("clipart", "icon", "illustration", "vector", "graphic", "stock image", "design")
_BOILERPLATE = (
    "click here to download",
    "free shipping on all orders",
    "image not available",
    "all rights reserved",
    "untitled",
    "img 2041 jpg",
    "dsc 00317",
    "view larger image",
    "share this post",
    "subscribe for more",
    "best price guaranteed",
    "photo by admin",
    "sponsored",
    "thumbnail",
    "loading",
)
_KEYWORDS = ("shapes", "geometry", "vector", "icon", "set", "abstract", "design", "clipart", "flat", "art", "symbol")


def salient_objects(scene: Scene, rng: random.Random) -> list[SceneObject]:
    """The one or two objects a terse caption names: large ones first."""
    ranked = sorted(scene.objects, key=lambda o: (o.size != "large", rng.random()))
    return ranked[: rng.choice((1, 2)) if len(ranked) > 1 else 1]


def web_caption(objects: Sequence[SceneObject], scene: Scene, rng: random.Random) -> str:
    """A terse, web-style caption naming `objects` (true of `scene` when the objects are its own)."""
    names = [f"{o.color} {rng.choice(SHAPE_WORDS[o.shape])}" for o in objects]
    style = rng.randrange(4)
    if style == 0:
        return " and ".join(names)
    if style == 1:
        return f"{' '.join(names)} {rng.choice(_WEB_SUFFIXES)}"
    if style == 2:
        return f"{names[0]} on {rng.choice(TEXTURE_WORDS[scene.texture])} background"
    return f"{rng.choice(('shapes with', 'picture with', 'simple'))} {join_phrases(names)}"


def _swap_one_attribute(objects: Sequence[SceneObject], scene: Scene, rng: random.Random) -> list[SceneObject]:
    """The same objects with one colour or shape changed to one the scene does not have; the changed object comes
    first, so that a caption naming only the first object still names it."""
    others = list(objects)
    target = others.pop(rng.randrange(len(others)))
    absent_colors = [c for c in COLORS if scene.count(color=c, shape=target.shape) == 0]
    absent_shapes = [s for s in SHAPES if scene.count(color=target.color, shape=s) == 0]
    if rng.random() < 0.5:
        changed = SceneObject(target.shape, rng.choice(absent_colors), target.size, 0, 0, 0, 0)
    else:
        changed = SceneObject(rng.choice(absent_shapes), target.color, target.size, 0, 0, 0, 0)
    return [changed, *others]


def _keyword_list(rng: random.Random) -> str:
    words = rng.sample(_KEYWORDS, rng.randint(3, 5))
    words += [rng.choice(tuple(COLORS)) for _ in range(rng.randint(1, 3))]
    words += [rng.choice(SHAPES) for _ in range(rng.randint(1, 2))]
    rng.shuffle(words)
    return rng.choice((", ", " ")).join(words)


def noisy_web_caption(kind: str, scene: Scene, other_scene: Scene | None, rng: random.Random) -> str:
    """A web caption that does not describe `scene`.

    Kinds: `mismatch` (a caption of `other_scene` naming only objects this scene lacks), `wrong_attributes` (a
    caption of this scene with a colour or shape swapped for one it lacks), `boilerplate` (page furniture),
    `keywords` (an SEO keyword list).
    """
    if kind == "mismatch":
        foreign = [o for o in other_scene.objects if o.kind not in scene.kinds()] if other_scene else []
        if not foreign:
            raise ValueError("a mismatch caption needs another scene with an object this one lacks")
        named = salient_objects(Scene(tuple(foreign), other_scene.texture, other_scene.background), rng)
        return web_caption(named, other_scene, rng)
    if kind == "wrong_attributes":
        return web_caption(_swap_one_attribute(salient_objects(scene, rng), scene, rng), scene, rng)
    if kind == "boilerplate":
        return " ".join(rng.sample(_BOILERPLATE, rng.choice((1, 2))))
    if kind == "keywords":
        return _keyword_list(rng)
    raise ValueError(f"unknown noise kind {kind!r}; choose from {NOISE_KINDS}")


# ---------------------------------------------------------------------------------------------------------------
# VQA: questions, and ten answers from annotators who mostly agree
# ---------------------------------------------------------------------------------------------------------------

QUESTION_TYPES = ("color", "count", "shape", "position", "yes/no")

_COLOR_CONFUSIONS = {
    "red": ("orange", "pink"),
    "orange": ("red", "yellow"),
    "yellow": ("orange", "white"),
    "green": ("blue", "yellow"),
    "blue": ("purple", "green"),
    "purple": ("violet", "blue", "pink"),
    "pink": ("purple", "red"),
    "white": ("gray", "yellow"),
}
_SHAPE_CONFUSIONS = {
    "circle": ("disk", "oval"),
    "square": ("box", "rectangle", "diamond"),
    "triangle": ("pyramid", "arrow"),
    "diamond": ("square", "rhombus"),
    "cross": ("plus", "x"),
}


def _matches(obj: SceneObject, other: SceneObject, attributes: Sequence[str]) -> bool:
    return all(getattr(obj, name) == getattr(other, name) for name in attributes)


def referring_expression(obj: SceneObject, scene: Scene, avoid: str, rng: random.Random) -> str | None:
    """The shortest 'the ...' that picks out `obj` alone without naming `avoid` ('color', 'shape' or 'position')."""
    for attributes in (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape")):
        if avoid in attributes:
            continue
        if sum(_matches(obj, other, attributes) for other in scene.objects) == 1:
            words = [rng.choice(SIZE_WORDS[obj.size]) if name == "size" else getattr(obj, name) for name in attributes]
            return "the " + " ".join(words)
    if avoid == "position":
        return None
    noun = "object" if avoid == "shape" else rng.choice(("shape", "object"))  # not "what shape is the shape"
    return f"the {noun} {place_phrase(obj, rng)}"


def _count_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    form = rng.randrange(3)
    if form == 0:
        question = rng.choice(("how many shapes are there", "how many objects are in the picture"))
        return question, str(len(scene.objects))
    if form == 1:
        color = rng.choice(tuple(COLORS))
        return f"how many {color} shapes are there", str(scene.count(color=color))
    shape = rng.choice(SHAPES)
    return f"how many {plural(shape)} are there", str(scene.count(shape=shape))


def _yes_no_question(scene: Scene, answer_yes: bool, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        if answer_yes:
            color, shape = rng.choice(scene.objects).kind
        else:
            color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if scene.count(color=c, shape=s) == 0])
        return f"is there {with_article(color + ' ' + shape)}", "yes" if answer_yes else "no"
    number = len(scene.objects) if answer_yes else rng.choice([n for n in range(1, 5) if n != len(scene.objects)])
    return f"does the picture show {counted(number, 'shape')}", "yes" if answer_yes else "no"


def vqa_question(scene: Scene, question_type: str, rng: random.Random, answer_yes: bool = True) -> tuple[str, str]:
    """(question, true answer) of the given type. `answer_yes` chooses the answer of a yes/no question.

    Position questions need an object that something other than its place picks out; the caller draws scenes
    until `can_ask_position(scene)`.
    """
    if question_type == "count":
        question, answer = _count_question(scene, rng)
    elif question_type == "yes/no":
        question, answer = _yes_no_question(scene, answer_yes, rng)
    elif question_type in ("color", "shape"):
        obj = rng.choice(scene.objects)
        question = f"what {question_type} is {referring_expression(obj, scene, question_type, rng)}"
        answer = obj.color if question_type == "color" else obj.shape
    elif question_type == "position":
        candidates = [o for o in scene.objects if referring_expression(o, scene, "position", rng) is not None]
        obj = rng.choice(candidates)
        question = f"where is {referring_expression(obj, scene, 'position', rng)}"
        answer = place_name(obj.row, obj.column)
    else:
        raise ValueError(f"unknown question type {question_type!r}; choose from {QUESTION_TYPES}")
    return question + "?", answer


def can_ask_position(scene: Scene) -> bool:
    return any(referring_expression(o, scene, "position", random.Random(0)) is not None for o in scene.objects)


def _answer_confusions(answer: str, question_type: str) -> tuple[str, ...]:
    """What a careless or differently-spoken annotator answers instead."""
    if question_type == "color":
        return _COLOR_CONFUSIONS[answer]
    if question_type == "shape":
        return _SHAPE_CONFUSIONS[answer]
    if question_type == "count":
        number = int(answer)
        return tuple(str(n) for n in (number - 1, number + 1) if n >= 0)
    if question_type == "yes/no":
        return ("no",) if answer == "yes" else ("yes",)
    if answer == "center":
        return ("middle",)
    return tuple(answer.split()) if " " in answer else (f"{answer} side", "center")


def annotator_answers(answer: str, question_type: str, rng: random.Random, num_answers: int = 10) -> list[str]:
    """Ten human-style answers: most say `answer`, up to four say something else (synonyms, near misses).

    At least six of ten agree, so the true answer is always the majority and scores 1.0 in VQA accuracy, while
    the others score min(count / 3, 1) and make the metric meaningful.
    """
    num_disagreeing = min(sum(rng.random() < 0.25 for _ in range(6)), 4)
    confusions = _answer_confusions(answer, question_type)
    answers = [answer] * (num_answers - num_disagreeing) + [rng.choice(confusions) for _ in range(num_disagreeing)]
    rng.shuffle(answers)
    return answers


# ---------------------------------------------------------------------------------------------------------------
# NLVR2: a statement about a pair of images, true or false
# ---------------------------------------------------------------------------------------------------------------

_SIDES = ("left", "right")


def _noun_filter(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A countable noun ('shape', 'red shape', 'circle') and the attributes it filters on."""
    form = rng.randrange(3)
    if form == 0:
        return "shape", {}
    if form == 1:
        color = rng.choice(tuple(COLORS))
        return f"{color} shape", {"color": color}
    shape = rng.choice(SHAPES)
    return shape, {"shape": shape}


def _count_statement(pair: tuple[Scene, Scene], rng: random.Random) -> tuple[str, bool]:
    side = rng.randrange(2)
    noun, attributes = _noun_filter(rng)
    actual = pair[side].count(**attributes)
    claimed = max(0, actual + rng.choice((-1, 0, 0, 1)))
    verb = rng.choice(("contains", "has", "shows"))
    exactly = "exactly " if claimed and rng.random() < 0.5 else ""
    return f"the {_SIDES[side]} image {verb} {exactly}{counted(claimed, noun)}", claimed == actual


def _both_statement(pair: tuple[Scene, Scene], rng: random.Random) -> tuple[str, bool]:
    color, shape = rng.choice(pair[rng.randrange(2)].objects).kind
    if rng.random() < 0.5:
        truth = all(scene.count(color=color, shape=shape) for scene in pair)
        return f"both images contain {with_article(color + ' ' + shape)}", truth
    truth = all(scene.count(color=color) for scene in pair)
    return f"both images have {with_article(color + ' shape')}", truth


def _more_statement(pair: tuple[Scene, Scene], rng: random.Random) -> tuple[str, bool]:
    noun, attributes = _noun_filter(rng)
    side = rng.randrange(2)
    more, fewer = pair[side].count(**attributes), pair[1 - side].count(**attributes)
    return f"the {_SIDES[side]} image has more {plural(noun)} than the {_SIDES[1 - side]} image", more > fewer


def _total_statement(pair: tuple[Scene, Scene], rng: random.Random) -> tuple[str, bool]:
    noun, attributes = _noun_filter(rng)
    actual = sum(scene.count(**attributes) for scene in pair)
    claimed = max(0, actual + rng.choice((-1, 0, 1)))
    if claimed >= len(NUMBER_WORDS):
        claimed = actual - 1
    phrasing = rng.choice(("there are {} in total", "the two images contain {} together"))
    return phrasing.format(counted(claimed, noun)), claimed == actual


def _exactly_one_statement(pair: tuple[Scene, Scene], rng: random.Random) -> tuple[str, bool]:
    color, shape = rng.choice(pair[rng.randrange(2)].objects).kind
    truth = sum(bool(scene.count(color=color, shape=shape)) for scene in pair) == 1
    return f"exactly one image contains {with_article(color + ' ' + shape)}", truth


_NLVR_TEMPLATES = (_count_statement, _both_statement, _more_statement, _total_statement, _exactly_one_statement)


def nlvr_statement(pair: tuple[Scene, Scene], label: bool, rng: random.Random, attempts: int = 40) -> str | None:
    """A statement about the pair whose truth is `label`, or None if none turned up (draw another pair).

    Statements name "the left image" and "the right image", never places inside an image, so swapping the two
    images together with the words keeps them true.
    """
    for _ in range(attempts):
        statement, truth = rng.choice(_NLVR_TEMPLATES)(pair, rng)
        if truth == label:
            return statement
    return None
