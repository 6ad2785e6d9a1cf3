"""The synthetic benchmark: BLIP's experiments in miniature, generated from a seed in seconds.

`build_synthetic_benchmark()` returns a `datasets.DatasetDict` with these splits:

- `human`: clean images with 5 reference captions each, like COCO (image, image_id, captions).
- `web`: one terse caption per image, a `noise_rate` share of them noisy, with the hidden truth kept
  (image, image_id, caption, is_noisy, noise_kind).
- `val`, `test`: captioning and retrieval evaluation, 5 references each (image, image_id, captions).
- `vqa_train`, `vqa_test`: three questions per image with ten annotator answers and BLIP's answer weights
  (image, image_id, question_id, question, question_type, answers, multiple_choice_answer, unique_answers,
  answer_weights).
- `nlvr_train`, `nlvr_test`: image pairs with a statement and whether it is true
  (image0, image1, image0_id, image1_id, sentence, label).

Image ids are unique across all splits, so retrieval positives can be defined by id. Every record is a pure
function of `(seed, split, index)`: two calls with the same arguments give identical datasets, and growing one
split does not change the others.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import textwrap
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFont

from ..data.loaders import vqa_answer_weights
from .language import (
    NOISE_KINDS,
    QUESTION_TYPES,
    annotator_answers,
    can_ask_position,
    human_captions,
    nlvr_statement,
    noisy_web_caption,
    salient_objects,
    vqa_question,
    web_caption,
)
from .scenes import Scene, encode_png, render_scene, sample_scene

QUESTIONS_PER_IMAGE = 3
NUM_REFERENCES = 5
_CHUNK = 250  # units per task sent to a worker process

CAPTIONS_FEATURES = Features({"image": ImageFeature(), "image_id": Value("int64"), "captions": List(Value("string"))})
WEB_FEATURES = Features(
    {
        "image": ImageFeature(),
        "image_id": Value("int64"),
        "caption": Value("string"),
        "is_noisy": Value("bool"),
        "noise_kind": Value("string"),  # "clean" or one of NOISE_KINDS
    }
)
VQA_FEATURES = Features(
    {
        "image": ImageFeature(),
        "image_id": Value("int64"),
        "question_id": Value("int64"),
        "question": Value("string"),
        "question_type": Value("string"),
        "answers": List(Value("string")),  # ten annotators
        "multiple_choice_answer": Value("string"),  # the majority answer, as VQA v2 names it
        "unique_answers": List(Value("string")),  # BLIP's training targets...
        "answer_weights": List(Value("float64")),  # ...and their weights, count / 10
    }
)
NLVR_FEATURES = Features(
    {
        "image0": ImageFeature(),
        "image1": ImageFeature(),
        "image0_id": Value("int64"),
        "image1_id": Value("int64"),
        "sentence": Value("string"),
        "label": Value("int64"),  # 1: the statement is true of the pair
    }
)


def _rng(seed: int, split: str, index: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so streams are independent and stable across runs.
    return random.Random(f"{seed}/{split}/{index}/{purpose}")


def _scene(seed: int, split: str, index: int, accept: Callable[[Scene], bool] | None = None) -> Scene:
    rng = _rng(seed, split, index, "scene")
    scene = sample_scene(rng)
    while accept is not None and not accept(scene):
        scene = sample_scene(rng)
    return scene


def _image(scene: Scene, seed: int, split: str, index: int, image_size: int) -> dict:
    """A `datasets.Image` value holding the PNG of a scene."""
    noise_seed = _rng(seed, split, index, "render").getrandbits(64)
    image = render_scene(scene, image_size, np.random.default_rng(noise_seed))
    return {"bytes": encode_png(image), "path": None}


def _caption_rows(seed: int, split: str, first_id: int, image_size: int, index: int) -> list[dict]:
    scene = _scene(seed, split, index)
    captions = human_captions(scene, _rng(seed, split, index, "captions"), NUM_REFERENCES)
    return [
        {"image": _image(scene, seed, split, index, image_size), "image_id": first_id + index, "captions": captions}
    ]


def _noise_plan(seed: int, num_images: int, noise_rate: float) -> dict[int, str]:
    """Which web images get a noisy caption, and of which kind: exactly round(rate * n), kinds in equal shares."""
    num_noisy = round(noise_rate * num_images)
    noisy = _rng(seed, "web", 0, "noise-plan").sample(range(num_images), num_noisy)
    return {index: NOISE_KINDS[position % len(NOISE_KINDS)] for position, index in enumerate(noisy)}


def _other_scene(seed: int, index: int, num_images: int, scene: Scene) -> Scene:
    """The scene of another web image that has at least one object this one lacks (for a mismatched caption)."""
    rng = _rng(seed, "web", index, "mismatch")
    while True:
        other_index = rng.randrange(num_images)
        other = _scene(seed, "web", other_index)
        if other_index != index and other.kinds() - scene.kinds():
            return other


def _web_rows(
    seed: int, num_images: int, plan: dict[int, str], first_id: int, image_size: int, index: int
) -> list[dict]:
    scene = _scene(seed, "web", index)
    rng = _rng(seed, "web", index, "caption")
    kind = plan.get(index, "clean")
    if kind == "clean":
        caption = web_caption(salient_objects(scene, rng), scene, rng)
    else:
        other = _other_scene(seed, index, num_images, scene) if kind == "mismatch" else None
        caption = noisy_web_caption(kind, scene, other, rng)
    image = _image(scene, seed, "web", index, image_size)
    return [
        {
            "image": image,
            "image_id": first_id + index,
            "caption": caption,
            "is_noisy": kind != "clean",
            "noise_kind": kind,
        }
    ]


def _vqa_rows(
    seed: int, split: str, num_questions: int, first_id: int, first_question_id: int, image_size: int, image_index: int
) -> list[dict]:
    """The questions about one image.

    Question types cycle through the five kinds and yes/no answers alternate over the whole split, so both are
    balanced exactly.
    """
    scene = _scene(seed, split, image_index, accept=can_ask_position)
    image = _image(scene, seed, split, image_index, image_size)
    rows = []
    first_question = image_index * QUESTIONS_PER_IMAGE
    for index in range(first_question, min(first_question + QUESTIONS_PER_IMAGE, num_questions)):
        question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]
        answer_yes = (index // len(QUESTION_TYPES)) % 2 == 0
        rng = _rng(seed, split, index, "question")
        question, answer = vqa_question(scene, question_type, rng, answer_yes)
        answers = annotator_answers(answer, question_type, rng)
        unique, weights = vqa_answer_weights(answers)
        rows.append(
            {
                "image": image,
                "image_id": first_id + image_index,
                "question_id": first_question_id + index,
                "question": question,
                "question_type": question_type,
                "answers": answers,
                "multiple_choice_answer": answer,
                "unique_answers": unique,
                "answer_weights": weights,
            }
        )
    return rows


def _nlvr_rows(seed: int, split: str, first_id: int, image_size: int, index: int) -> list[dict]:
    """One pair. Labels alternate true/false over the split, so they are balanced exactly."""
    label = index % 2 == 0
    rng = _rng(seed, split, index, "pair")
    statement = None
    while statement is None:
        pair = (sample_scene(rng), sample_scene(rng))
        statement = nlvr_statement(pair, label, rng)
    return [
        {
            "image0": _image(pair[0], seed, split, 2 * index, image_size),
            "image1": _image(pair[1], seed, split, 2 * index + 1, image_size),
            "image0_id": first_id + 2 * index,
            "image1_id": first_id + 2 * index + 1,
            "sentence": statement,
            "label": int(label),
        }
    ]


def benchmark_texts(seed: int = 0, num_scenes: int = 400) -> list[str]:
    """Texts of every kind the benchmark writes (human and web captions, the noisy kinds, questions with their
    annotators' answers, NLVR2 statements) about `num_scenes` scenes drawn without rendering an image: the corpus of
    a vocabulary meant for all of the benchmark's tasks, so that a model pretrained on captions alone does not meet
    the questions' words in pieces when it is fine-tuned. Deterministic from `seed`."""
    texts = []
    for index in range(num_scenes):
        rng = _rng(seed, "vocabulary", index, "texts")
        scene, other = sample_scene(rng), sample_scene(rng)
        while not other.kinds() - scene.kinds():  # a mismatched caption names an object the scene lacks
            other = sample_scene(rng)
        texts += human_captions(scene, rng)
        texts.append(web_caption(salient_objects(scene, rng), scene, rng))
        texts += [noisy_web_caption(kind, scene, other, rng) for kind in NOISE_KINDS]
        for question_type in QUESTION_TYPES:
            if question_type == "position" and not can_ask_position(scene):
                continue
            question, answer = vqa_question(scene, question_type, rng, answer_yes=index % 2 == 0)
            texts += [question, *annotator_answers(answer, question_type, rng)]
        statement = nlvr_statement((scene, other), index % 2 == 0, rng)
        if statement is not None:
            texts.append(statement)
    return texts


def _rows_for(make_rows: Callable[[int], list[dict]], indices: range) -> list[dict]:
    return [row for index in indices for row in make_rows(index)]


def _chunks(num_units: int) -> list[range]:
    return [range(start, min(start + _CHUNK, num_units)) for start in range(0, num_units, _CHUNK)]


def _to_dataset(rows: list[dict], features: Features) -> Dataset:
    columns = {name: [row[name] for row in rows] for name in features}
    return Dataset.from_dict(columns, features=features)


def build_synthetic_benchmark(
    seed: int = 0,
    image_size: int = 64,
    num_human: int = 2000,
    num_web: int = 6000,
    num_val: int = 200,
    num_test: int = 500,
    num_vqa: int = 3000,
    num_vqa_test: int | None = None,
    num_nlvr: int = 1500,
    num_nlvr_test: int | None = None,
    noise_rate: float = 0.4,
    num_proc: int | None = None,
) -> DatasetDict:
    """Generate the synthetic benchmark (see the module docstring for its splits and columns).

    Args:
        seed: everything follows from it.
        image_size: side of the square images in pixels.
        num_human: images in the clean "human" split (5 captions each).
        num_web: images in the "web" split (1 caption each).
        num_val, num_test: images in the captioning/retrieval evaluation splits (5 captions each).
        num_vqa, num_vqa_test: questions in the VQA splits (3 per image); the test default is a quarter.
        num_nlvr, num_nlvr_test: image pairs in the NLVR2 splits; the test default is a quarter.
        noise_rate: share of web captions that are noisy, split equally between mismatched captions, wrong
            attributes, boilerplate and keyword lists. Exactly `round(noise_rate * num_web)` are noisy.
        num_proc: worker processes; by default all cores for a large benchmark and none for a small one. The
            result does not depend on it.
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate}")
    num_vqa_test = max(1, num_vqa // 4) if num_vqa_test is None else num_vqa_test
    num_nlvr_test = max(1, num_nlvr // 4) if num_nlvr_test is None else num_nlvr_test

    # Image ids are consecutive across splits in this order; question ids likewise across the VQA splits.
    images_per_split = {
        "human": num_human,
        "web": num_web,
        "val": num_val,
        "test": num_test,
        "vqa_train": math.ceil(num_vqa / QUESTIONS_PER_IMAGE),
        "vqa_test": math.ceil(num_vqa_test / QUESTIONS_PER_IMAGE),
        "nlvr_train": 2 * num_nlvr,
        "nlvr_test": 2 * num_nlvr_test,
    }
    first_ids = dict(zip(images_per_split, np.cumsum([0, *images_per_split.values()]).tolist()))

    # split -> (row builder, units to build, features); a unit is an image, a VQA image's questions, or a pair.
    def captions_job(name: str, count: int) -> tuple:
        return partial(_caption_rows, seed, name, first_ids[name], image_size), count, CAPTIONS_FEATURES

    def vqa_job(name: str, num_questions: int, first_question_id: int) -> tuple:
        make_rows = partial(_vqa_rows, seed, name, num_questions, first_ids[name], first_question_id, image_size)
        return make_rows, images_per_split[name], VQA_FEATURES

    def nlvr_job(name: str, count: int) -> tuple:
        return partial(_nlvr_rows, seed, name, first_ids[name], image_size), count, NLVR_FEATURES

    plan = _noise_plan(seed, num_web, noise_rate)
    jobs = {
        "human": captions_job("human", num_human),
        "web": (partial(_web_rows, seed, num_web, plan, first_ids["web"], image_size), num_web, WEB_FEATURES),
        "val": captions_job("val", num_val),
        "test": captions_job("test", num_test),
        "vqa_train": vqa_job("vqa_train", num_vqa, 0),
        "vqa_test": vqa_job("vqa_test", num_vqa_test, num_vqa),
        "nlvr_train": nlvr_job("nlvr_train", num_nlvr),
        "nlvr_test": nlvr_job("nlvr_test", num_nlvr_test),
    }
    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if sum(images_per_split.values()) >= 2000 else 1
    if multiprocessing.current_process().daemon:  # e.g. inside a DataLoader worker: no child processes allowed
        num_proc = 1
    if num_proc <= 1:
        rows = {name: _rows_for(make_rows, range(count)) for name, (make_rows, count, _) in jobs.items()}
    else:
        # Submit every chunk of every split first, so that no worker waits for a small split to finish.
        with ProcessPoolExecutor(num_proc) as pool:
            futures = {
                name: [pool.submit(_rows_for, make_rows, chunk) for chunk in _chunks(count)]
                for name, (make_rows, count, _) in jobs.items()
            }
            rows = {
                name: [row for future in split_futures for row in future.result()]
                for name, split_futures in futures.items()
            }
    return DatasetDict({name: _to_dataset(rows[name], features) for name, (_, _, features) in jobs.items()})


# ---------------------------------------------------------------------------------------------------------------
# A picture of the benchmark, for the documentation
# ---------------------------------------------------------------------------------------------------------------

_CELL_WIDTH = 208
_IMAGE_AREA = 192
_GAP = 8
_TEXT_LINES = 6
_LINE_HEIGHT = 14


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)  # present on most Linux systems
    except OSError:
        return ImageFont.load_default(size=size)


def _cell(images: list[Image.Image], text: str, font: ImageFont.ImageFont) -> Image.Image:
    """One grid cell: the image(s) side by side, scaled up without smoothing, and the text wrapped below."""
    side = (_IMAGE_AREA - (len(images) - 1) * _GAP) // len(images)
    lines = textwrap.wrap(text, width=33)[:_TEXT_LINES]
    cell = Image.new("RGB", (_CELL_WIDTH, side + 3 * _GAP + len(lines) * _LINE_HEIGHT), "white")
    left = (_CELL_WIDTH - _IMAGE_AREA) // 2
    for position, image in enumerate(images):
        resized = image.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
        cell.paste(resized, (left + position * (side + _GAP), _GAP // 2))
    draw = ImageDraw.Draw(cell)
    for line_index, line in enumerate(lines):
        draw.text((left, side + _GAP + line_index * _LINE_HEIGHT), line, fill="black", font=font)
    return cell


def _answer_summary(answers: list[str]) -> str:
    return ", ".join(f"{answer} x{count}" for answer, count in Counter(answers).most_common())


def _sample_rows(benchmark: DatasetDict, per_row: int, font: ImageFont.ImageFont) -> list[list[Image.Image]]:
    """Rows of cells: human captions, web captions (clean, then noisy), VQA (one question per image), NLVR2."""
    human = [
        _cell([row["image"]], f"human (1 of 5): {row['captions'][0]}", font)
        for row in benchmark["human"].select(range(per_row))
    ]
    web = benchmark["web"]
    is_noisy = web["is_noisy"]  # the column alone, without decoding every image
    clean = [i for i, noisy in enumerate(is_noisy) if not noisy][: per_row // 2]
    noisy = [i for i, noisy in enumerate(is_noisy) if noisy][: per_row - len(clean)]
    web_cells = []
    for row in web.select(clean + noisy):
        tag = f"noisy: {row['noise_kind'].replace('_', ' ')}" if row["is_noisy"] else "clean"
        web_cells.append(_cell([row["image"]], f"web ({tag}): {row['caption']}", font))
    vqa = benchmark["vqa_train"]
    one_per_image = range(0, min(len(vqa), per_row * QUESTIONS_PER_IMAGE), QUESTIONS_PER_IMAGE)
    vqa_cells = [
        _cell([row["image"]], f"vqa: {row['question']} -> {_answer_summary(row['answers'])}", font)
        for row in vqa.select(one_per_image)
    ]
    nlvr_cells = [
        _cell(
            [row["image0"], row["image1"]], f"nlvr2 ({'true' if row['label'] else 'false'}): {row['sentence']}", font
        )
        for row in benchmark["nlvr_train"].select(range(per_row))
    ]
    return [human, web_cells, vqa_cells, nlvr_cells]


def save_sample_grid(benchmark: DatasetDict, path: str | os.PathLike, per_row: int = 4) -> Image.Image:
    """Save (and return) a PNG grid of samples with their text, `per_row` samples per row.

    One row per kind: human captions, web captions (clean and noisy), VQA questions with their ten answers, NLVR2
    pairs with their statements.
    """
    rows = _sample_rows(benchmark, per_row, _font())
    heights = [max(cell.height for cell in row) for row in rows]
    grid = Image.new("RGB", (per_row * _CELL_WIDTH, sum(heights)), "white")
    top = 0
    for row, height in zip(rows, heights):
        for column, cell in enumerate(row):
            grid.paste(cell, (column * _CELL_WIDTH, top))
        top += height
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return grid
