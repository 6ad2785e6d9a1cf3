"""The field's metrics: COCO caption scores equal pycocoevalcap's, with or without Java; VQA accuracy by the official
rules; retrieval recall as the original's `itm_eval`; NLVR2 accuracy; all four as offline `evaluate` modules."""

import json
import logging
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from transformers_blip.evaluation import caption_metrics
from transformers_blip.evaluation.caption_metrics import caption_scores, ptb_tokenize, tokenize_captions
from transformers_blip.evaluation.retrieval_metrics import retrieval_recall
from transformers_blip.evaluation.vqa_accuracy import nlvr_accuracy, normalize_answer, vqa_accuracy

SUBJECTS = [
    "A man", "The woman", "Two dogs", "A child's toy", "Three people", "An old-fashioned car", "The cat",
    "A well-dressed man", "Mr. Smith", "A B-52 bomber", "Some kids", "The players' bench", "A 10-year-old girl",
    "Two men", "A 1,000-piece puzzle", "The U.S. flag", "A black-and-white photo", "People",
]  # fmt: skip
VERBS = [
    "is standing", "isn't sitting", "doesn't look", "sits", "they're playing", "it's lying", "we've seen",
    "won't move", "can't stop", "is running", "I'm watching", "You'll see", "who'd been waiting", "cannot wait",
    "is gonna jump", "are riding",
]  # fmt: skip
PLACES = [
    "on a red bench", 'near the "old" bridge', "in the park (at 10:30 a.m.)", "next to a $5 sign", "by 3.5 meters",
    "at 50% speed", "under the sky; clouds", "with a 'big' smile", "-- near the lake", "in front of St. Louis' arch",
    "on the left/right side", "at a well-lit 24-hour diner", "[on the grass]", "with friends, family and pets",
    "for the 2nd time", "in the 1990s-era room", "at the dog's house", "on the road... slowly", "& their bikes",
    'by the "so-called" tower', "w/ a sign that says 'STOP' at 5:00pm", "near theirs--they won't say",
]  # fmt: skip
ENDS = [".", "!", "?", " .", "", "...", "!!", " ."]


def caption_corpus(num_images: int = 60, per_image: int = 5, seed: int = 0) -> dict[int, list[str]]:
    """Captions with punctuation, contractions, hyphens, numbers, quotes, brackets and mixed case."""
    rng = random.Random(seed)
    corpus = {}
    for image_id in range(num_images):
        texts = []
        for _ in range(per_image):
            text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}{rng.choice(ENDS)}"
            if rng.random() < 0.3:
                text = text.upper() if rng.random() < 0.3 else text.capitalize()
            if rng.random() < 0.2:
                text = f"  {text} "
            texts.append(text)
        corpus[image_id] = texts
    return corpus


@pytest.fixture(scope="module")
def corpus():
    references = caption_corpus()
    rng = random.Random(1)
    # A prediction per image: one of its references reworded, or another image's caption.
    predictions = {
        key: (texts[0].lower().replace("a ", "the ", 1) if rng.random() < 0.6 else references[(key + 7) % 60][1])
        for key, texts in references.items()
    }
    return predictions, references


@pytest.fixture(scope="module")
def reference_scores(corpus):
    """pycocoevalcap's own pipeline: Java's PTBTokenizer, then its four scorers."""
    predictions, references = corpus
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": text} for text in texts] for key, texts in references.items()})
    res = tokenizer.tokenize({key: [{"caption": predictions[key]}] for key in references})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"Bleu_{n}": value for n, value in enumerate(bleu, start=1)}
    scores["METEOR"] = Meteor().compute_score(gts, res)[0]
    scores["ROUGE_L"] = Rouge().compute_score(gts, res)[0]
    scores["CIDEr"] = Cider().compute_score(gts, res)[0]
    return scores


def test_python_tokenisation_gives_the_ptb_tokenizers_tokens(corpus):
    predictions, references = corpus
    texts = [text for texts in references.values() for text in texts] + list(predictions.values())
    java = PTBTokenizer().tokenize({0: [{"caption": text} for text in texts]})[0]
    assert len(texts) >= 300
    assert [ptb_tokenize(text) for text in texts] == java


def test_caption_scores_equal_pycocoevalcap(corpus, reference_scores):
    predictions, references = corpus
    scores = caption_scores(predictions, references, tokenizer="python")
    assert scores.keys() == reference_scores.keys()
    for name, value in reference_scores.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name
    assert 0.05 < scores["Bleu_4"] < 0.95 and scores["CIDEr"] > 0.1  # a corpus that tells metrics apart


def test_caption_scores_with_the_java_tokenizer(corpus, reference_scores):
    predictions, references = corpus
    scores = caption_scores(predictions, references, tokenizer="java", meteor=False)
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert scores[name] == pytest.approx(reference_scores[name], abs=1e-6), name
    # Where Java is installed, "auto" is the Java tokenizer.
    sample = {key: references[key] for key in list(references)[:3]}
    assert tokenize_captions(sample, "auto") == PTBTokenizer().tokenize(
        {key: [{"caption": text} for text in texts] for key, texts in sample.items()}
    )


def test_without_java_the_scores_stay_and_meteor_is_left_out_with_a_message(
    corpus, reference_scores, monkeypatch, caplog
):
    predictions, references = corpus
    monkeypatch.setattr(caption_metrics, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger=caption_metrics.__name__):
        scores = caption_scores(predictions, references)
    assert "METEOR" not in scores and "Java" in caplog.text
    for name in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert scores[name] == pytest.approx(reference_scores[name], abs=1e-6)
    with pytest.raises(RuntimeError, match="Java"):
        caption_scores(predictions, references, meteor=True)


def test_caption_scores_name_mismatched_ids():
    with pytest.raises(ValueError, match="without references"):
        caption_scores({1: "a cat", 2: "a dog"}, {1: ["a cat"]}, tokenizer="python", meteor=False)
    with pytest.raises(ValueError, match="without a prediction"):
        caption_scores({1: "a cat"}, {1: ["a cat"], 3: ["a dog"]}, tokenizer="python", meteor=False)
    with pytest.raises(ValueError, match="lists"):
        caption_scores({1: "a cat"}, {1: "a cat"}, tokenizer="python", meteor=False)


@pytest.mark.parametrize(
    "answer, normalised",
    [
        ("Two", "2"),  # number words become digits
        ("the dog", "dog"),  # articles go
        ("Yes.", "yes"),  # a period not before a digit is dropped
        ("3.5", "3.5"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("black/white", "black white"),  # a mark joining two words becomes a space
        ("red, blue", "red blue"),  # a mark next to a space is removed
        ("1,000", "1000"),  # a comma between digits: every mark is removed
        ("  a\tcat\n", "cat"),
    ],
)
def test_vqa_answer_normalisation(answer, normalised):
    assert normalize_answer(answer) == normalised


def test_vqa_accuracy_by_hand():
    humans = {
        # 3 of 10 said "yes": leaving out one of those 3 leaves 2 (2/3), leaving out another leaves 3 (1).
        1: ["yes"] * 3 + ["no"] * 7,
        2: ["2"] * 10,  # "two" is normalised to "2": every subset matches 9 >= 3
        3: ["red"] + ["blue"] * 9,  # "red" by one human: 0 of 9 in nine subsets, 0 of 9 when that one is out
        4: ["dog"] * 2 + ["cat"] * 8,
    }
    predictions = {1: "Yes", 2: "two", 3: "red", 4: "the dog"}
    per_question = [(3 * (2 / 3) + 7 * 1) / 10, 1.0, (1 * 0 + 9 * (1 / 3)) / 10, (2 * (1 / 3) + 8 * (2 / 3)) / 10]
    assert vqa_accuracy(predictions, humans)["accuracy"] == pytest.approx(100 * np.mean(per_question))
    with pytest.raises(ValueError, match="no prediction for questions"):
        vqa_accuracy({1: "yes"}, humans)


def test_nlvr_accuracy():
    assert nlvr_accuracy([1, 0, 1, 1], [1, 1, 1, 0])["accuracy"] == 50.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        nlvr_accuracy([1, 0, 1], [1, 0])


def itm_eval_by_argsort(score_i2t: np.ndarray, score_t2i: np.ndarray, text_to_image: list[int]) -> dict:
    """The original's way: rank every row by argsort and take the best rank among the ground truth."""
    image_to_texts = {}
    for text, image in enumerate(text_to_image):
        image_to_texts.setdefault(image, []).append(text)
    i2t_ranks = []
    for image, scores in enumerate(score_i2t):
        order = list(np.argsort(-scores, kind="stable"))
        i2t_ranks.append(min(order.index(text) for text in image_to_texts[image]))
    t2i_ranks = [
        list(np.argsort(-scores, kind="stable")).index(text_to_image[t]) for t, scores in enumerate(score_t2i)
    ]
    return {
        **{f"txt_r{k}": 100 * np.mean(np.array(i2t_ranks) < k) for k in (1, 5, 10)},
        **{f"img_r{k}": 100 * np.mean(np.array(t2i_ranks) < k) for k in (1, 5, 10)},
    }


def test_retrieval_recall_equals_the_originals_ranking():
    generator = torch.Generator().manual_seed(0)
    text_to_image = [i // 5 for i in range(100)]  # 20 images x 5 texts
    score_i2t = torch.randn(20, 100, generator=generator)
    score_t2i = torch.randn(100, 20, generator=generator)  # re-ranked: not the transpose
    for image, text in enumerate(range(0, 100, 5)):
        score_i2t[image, text + 2] += 2.0  # make some retrievals succeed
        score_t2i[text, image] += 1.5
    ours = retrieval_recall(score_i2t, score_t2i, text_to_image)
    expected = itm_eval_by_argsort(score_i2t.numpy(), score_t2i.numpy(), text_to_image)
    for name, value in expected.items():
        assert ours[name] == pytest.approx(value), name
    assert ours["r_mean"] == pytest.approx(np.mean(list(expected.values())))
    assert 0 < ours["txt_r1"] < 100 and 0 < ours["img_r1"] < 100


def test_retrieval_recall_by_hand():
    # Image 0 owns texts 0 and 1, image 1 owns text 2. Image 0's best own text (1) ranks second behind text 2.
    score_i2t = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.1, 0.3]])
    score_t2i = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    metrics = retrieval_recall(score_i2t, score_t2i, [0, 0, 1], ks=(1, 2))
    assert (metrics["txt_r1"], metrics["txt_r2"]) == (50.0, 100.0)
    assert metrics["img_r1"] == pytest.approx(200 / 3) and metrics["img_r2"] == 100.0
    with pytest.raises(ValueError, match="score_t2i must be"):
        retrieval_recall(score_i2t, score_t2i.T, [0, 0, 1])
    with pytest.raises(ValueError, match=r"images without a text: \[1\]"):
        retrieval_recall(score_i2t, score_t2i, [0, 0, 0])


def test_retrieval_recall_counts_a_tie_against_the_ground_truth():
    # Re-ranked with k_test = 1: each query's one candidate is scored, every other cell is -100. Image 1's text and
    # text 1's image fall outside the top 1, so they are not found at K = 2 either: the tie with the other -100 cell
    # counts against them.
    unranked = -100.0
    score_i2t = torch.tensor([[0.9, unranked, unranked], [0.7, unranked, unranked], [unranked, unranked, 0.8]])
    score_t2i = torch.tensor([[0.9, unranked, unranked], [unranked, unranked, 0.5], [unranked, unranked, 0.8]])
    metrics = retrieval_recall(score_i2t, score_t2i, [0, 1, 2], ks=(1, 2))
    assert metrics["txt_r1"] == metrics["txt_r2"] == pytest.approx(200 / 3)
    assert metrics["img_r1"] == metrics["img_r2"] == pytest.approx(200 / 3)


def test_metrics_load_as_offline_evaluate_modules(tmp_path):
    code = """
import json, evaluate
from transformers_blip.evaluation.metrics import metric_path
out = {
    "vqa": evaluate.load(metric_path("vqa")).compute(predictions=["two"], references=[["2"] * 10]),
    "nlvr": evaluate.load(metric_path("nlvr")).compute(predictions=[1, 0], references=[1, 1]),
    "retrieval": evaluate.load(metric_path("retrieval")).compute(
        predictions=[[0.9, 0.1], [0.8, 0.2]], references=[0, 1]
    ),
    "caption": evaluate.load(metric_path("caption")).compute(
        predictions=["a red square"], references=[["a red square", "a red box"]], tokenizer="python", meteor=False
    ),
}
print(json.dumps(out))
"""
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["vqa"] == {"accuracy": 100.0}
    assert out["nlvr"] == {"accuracy": 50.0}
    assert out["retrieval"]["txt_r1"] == 100.0 and out["retrieval"]["img_r1"] == 50.0
    assert out["caption"]["ROUGE_L"] == pytest.approx(1.0) and "METEOR" not in out["caption"]


def test_itc_recall_at_k_is_retrieval_recall_with_one_matrix():
    from transformers_blip.evaluation import recall_at_k

    generator = torch.Generator().manual_seed(1)
    text_to_image = [i // 3 for i in range(30)]  # 10 images x 3 texts
    similarity = torch.randn(10, 30, generator=generator)
    metrics = recall_at_k(similarity, torch.tensor(text_to_image))
    expected = itm_eval_by_argsort(similarity.numpy(), similarity.t().numpy(), text_to_image)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
