"""The synthetic benchmark: schema, determinism, unique ids, exact noise and label balance, learnable text."""

import random
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from transformers_blip.benchmark import build_synthetic_benchmark
from transformers_blip.benchmark.build import save_sample_grid
from transformers_blip.benchmark.language import (
    NOISE_KINDS,
    QUESTION_TYPES,
    SHAPE_WORDS,
    human_captions,
    noisy_web_caption,
    salient_objects,
    vqa_question,
    web_caption,
)
from transformers_blip.benchmark.scenes import COLORS, render_scene, sample_scene
from transformers_blip.data import flatten_captions, pre_caption, pre_question

TINY = dict(image_size=32, num_human=10, num_web=40, num_val=4, num_test=6, num_vqa=30, num_nlvr=12)


@pytest.fixture(scope="module")
def benchmark():
    return build_synthetic_benchmark(seed=3, noise_rate=0.4, **TINY)


def test_splits_and_columns(benchmark):
    assert {name: set(split.column_names) for name, split in benchmark.items()} == {
        "human": {"image", "image_id", "captions"},
        "web": {"image", "image_id", "caption", "is_noisy", "noise_kind"},
        "val": {"image", "image_id", "captions"},
        "test": {"image", "image_id", "captions"},
        "vqa_train": {
            "image",
            "image_id",
            "question_id",
            "question",
            "question_type",
            "answers",
            "multiple_choice_answer",
            "unique_answers",
            "answer_weights",
        },
        "vqa_test": set(benchmark["vqa_train"].column_names),
        "nlvr_train": {"image0", "image1", "image0_id", "image1_id", "sentence", "label"},
        "nlvr_test": {"image0", "image1", "image0_id", "image1_id", "sentence", "label"},
    }
    assert len(benchmark["human"]) == 10 and len(benchmark["web"]) == 40 and len(benchmark["test"]) == 6
    assert len(benchmark["vqa_train"]) == 30 and len(benchmark["vqa_test"]) == 7
    assert len(benchmark["nlvr_train"]) == 12 and len(benchmark["nlvr_test"]) == 3
    image = benchmark["human"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB"


def test_same_seed_same_benchmark_other_seed_other_benchmark(benchmark):
    again = build_synthetic_benchmark(seed=3, noise_rate=0.4, **TINY)
    other = build_synthetic_benchmark(seed=4, noise_rate=0.4, **TINY)
    for split in ("human", "web", "vqa_train", "nlvr_test"):
        assert again[split].to_dict() == benchmark[split].to_dict()
    assert other["human"]["captions"] != benchmark["human"]["captions"]


def test_parallel_generation_gives_the_same_records():
    serial = build_synthetic_benchmark(seed=1, **TINY, num_proc=1)
    parallel = build_synthetic_benchmark(seed=1, **TINY, num_proc=2)
    for split in serial:
        assert serial[split].to_dict() == parallel[split].to_dict()


def test_a_split_does_not_change_when_another_grows():
    small = build_synthetic_benchmark(seed=2, **TINY)
    grown = build_synthetic_benchmark(seed=2, **{**TINY, "num_web": 80})
    assert small["human"]["captions"] == grown["human"]["captions"]
    assert small["vqa_train"]["question"] == grown["vqa_train"]["question"]


def test_image_ids_are_unique_across_splits(benchmark):
    ids = []
    for split in benchmark.values():
        for column in ("image_id", "image0_id", "image1_id"):
            if column in split.column_names:
                ids += list(dict.fromkeys(split[column]))  # VQA rows share their image's id
    assert len(ids) == len(set(ids))
    question_ids = list(benchmark["vqa_train"]["question_id"]) + list(benchmark["vqa_test"]["question_id"])
    assert len(question_ids) == len(set(question_ids))


def test_human_captions_are_five_distinct_clean_references(benchmark):
    for captions in list(benchmark["human"]["captions"]) + list(benchmark["test"]["captions"]):
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert pre_caption(caption, max_words=30) == caption  # already clean, within the pretraining limit


def test_noise_rate_is_exact_and_kinds_are_balanced():
    web = build_synthetic_benchmark(seed=0, **{**TINY, "num_web": 100}, noise_rate=0.3)["web"]
    assert sum(web["is_noisy"]) == 30
    kinds = Counter(kind for kind, noisy in zip(web["noise_kind"], web["is_noisy"]) if noisy)
    assert set(kinds) == set(NOISE_KINDS) and max(kinds.values()) - min(kinds.values()) <= 1
    assert all(kind == "clean" for kind, noisy in zip(web["noise_kind"], web["is_noisy"]) if not noisy)
    assert all(pre_caption(caption) == caption and caption for caption in web["caption"])


def test_noise_rate_extremes():
    clean = build_synthetic_benchmark(seed=0, **TINY, noise_rate=0.0)["web"]
    noisy = build_synthetic_benchmark(seed=0, **TINY, noise_rate=1.0)["web"]
    assert not any(clean["is_noisy"]) and all(noisy["is_noisy"])


def test_clean_web_captions_name_what_is_drawn_and_noisy_ones_do_not(benchmark):
    """A colour word in a clean web caption is visible in the image; a mismatched caption names a colour the
    image lacks (checked on pixels: a colour is present when enough pixels are close to it)."""

    def colours_in(image):
        pixels = np.asarray(image, dtype=np.int32).reshape(-1, 3)
        return {
            name for name, rgb in COLORS.items() if (np.abs(pixels - np.asarray(rgb)).max(axis=1) <= 20).sum() >= 4
        }

    web = benchmark["web"]
    checked = 0
    for row in web:
        named = {word for word in row["caption"].split() if word in COLORS}
        if row["noise_kind"] == "clean" and named:
            assert named <= colours_in(row["image"]), row["caption"]
            checked += 1
    assert checked >= 10


def test_vqa_answers_types_and_balance(benchmark):
    vqa = benchmark["vqa_train"]
    types = Counter(vqa["question_type"])
    assert set(types) == set(QUESTION_TYPES) and max(types.values()) - min(types.values()) == 0
    yes_no = [row["multiple_choice_answer"] for row in vqa if row["question_type"] == "yes/no"]
    assert abs(yes_no.count("yes") - yes_no.count("no")) <= 1 and set(yes_no) == {"yes", "no"}
    disagreements = 0
    for row in vqa:
        answers = row["answers"]
        assert len(answers) == 10 and pre_question(row["question"]) == row["question"]
        counts = Counter(answers)
        assert (
            counts.most_common(1)[0][0] == row["multiple_choice_answer"] and counts[row["multiple_choice_answer"]] >= 6
        )
        assert row["unique_answers"] == list(dict.fromkeys(answers))
        assert row["answer_weights"] == [counts[a] / 10 for a in row["unique_answers"]]
        disagreements += len(counts) > 1
    assert disagreements > 0  # annotators disagree sometimes, so VQA accuracy is not all-or-nothing


def test_vqa_answers_are_true_of_the_scene():
    rng = random.Random(0)
    for _ in range(200):
        scene = sample_scene(rng)
        question, answer = vqa_question(scene, "count", rng)
        if question.startswith("how many shapes"):
            assert answer == str(len(scene.objects))
        question, answer = vqa_question(scene, "color", rng)
        assert answer in {obj.color for obj in scene.objects}


def test_nlvr_labels_are_balanced(benchmark):
    for split in ("nlvr_train", "nlvr_test"):
        labels = benchmark[split]["label"]
        assert set(labels) <= {0, 1} and abs(sum(labels) - (len(labels) - sum(labels))) <= 1
    sentences = benchmark["nlvr_train"]["sentence"]
    assert all(pre_caption(s, max_words=40) == s for s in sentences)


def test_flatten_captions_gives_one_pair_per_caption(benchmark):
    pairs = flatten_captions(benchmark["human"])
    assert len(pairs) == 5 * len(benchmark["human"])
    assert set(pairs.column_names) == {"image", "image_id", "caption"}
    assert pairs[7]["caption"] == benchmark["human"][1]["captions"][2]
    assert pairs[7]["image_id"] == benchmark["human"][1]["image_id"]
    assert np.array_equal(np.asarray(pairs[7]["image"]), np.asarray(benchmark["human"][1]["image"]))


def test_objects_are_visible_at_32_pixels():
    """Each object covers enough pixels of its colour to be seen (no object smaller than a few pixels)."""
    rng = random.Random(1)
    for index in range(50):
        scene = sample_scene(rng)
        image = np.asarray(render_scene(scene, 32, np.random.default_rng(index)), dtype=np.int32)
        for obj in scene.objects:
            close = np.abs(image - np.asarray(COLORS[obj.color])).max(axis=2) <= 30
            assert close.sum() >= 6, (obj, close.sum())


def test_human_captions_of_one_object_scene_are_distinct():
    rng = random.Random(5)
    scene = sample_scene(rng, min_objects=1, max_objects=1)
    assert len(set(human_captions(scene, rng))) == 5


def test_tiny_benchmark_is_fast():
    start = time.perf_counter()
    build_synthetic_benchmark(**TINY)
    assert time.perf_counter() - start < 2.0


def test_sample_grid(benchmark, tmp_path):
    path = tmp_path / "docs" / "grid.png"
    grid = save_sample_grid(benchmark, path, per_row=3)
    assert path.exists() and Image.open(path).size == grid.size
    assert grid.width == 3 * 208 and grid.height > 3 * 192 + 92  # three rows of single images, one of pairs
    # The first cell shows the first human image (32 px) scaled up six times without smoothing.
    first = np.asarray(benchmark["human"][0]["image"])
    np.testing.assert_array_equal(np.asarray(grid)[4 + 3 : 4 + 192 : 6, 8 + 3 : 8 + 192 : 6], first)


def named_kinds(caption: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a web caption names, shape synonyms mapped back."""
    words = caption.replace(",", " ").split()
    synonyms = {word: shape for shape, names in SHAPE_WORDS.items() for name in names for word in [name.split()[0]]}
    return {(a, synonyms[b]) for a, b in zip(words, words[1:]) if a in COLORS and b in synonyms}


def test_web_captions_are_true_when_clean_and_false_when_mismatched_or_wrong():
    rng = random.Random(0)
    for _ in range(300):
        scene, other = sample_scene(rng), sample_scene(rng)
        clean = web_caption(salient_objects(scene, rng), scene, rng)
        assert named_kinds(clean) and named_kinds(clean) <= scene.kinds(), clean
        wrong = noisy_web_caption("wrong_attributes", scene, None, rng)
        assert named_kinds(wrong) - scene.kinds(), (wrong, scene)
        if other.kinds() - scene.kinds():
            mismatch = noisy_web_caption("mismatch", scene, other, rng)
            assert named_kinds(mismatch) and not named_kinds(mismatch) & scene.kinds(), (mismatch, scene)
