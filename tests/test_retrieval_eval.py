"""BLIP's retrieval evaluation (ITC top-k, then ITM re-ranking): the batched scores equal the original's per-query
loop, whatever the chunk sizes or the number of processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config, random_image
from dist_retrieval_eval import K_TEST, make_inputs, make_model

from transformers_blip import BlipForImageTextRetrieval, BlipModel
from transformers_blip.evaluation import UNRANKED_SCORE, evaluate_retrieval, retrieval_recall, retrieval_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_retrieval_eval import per_query_scores  # noqa: E402

SCRIPT = Path(__file__).with_name("dist_retrieval_eval.py")


def assert_same_scores(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert torch.equal(ours == UNRANKED_SCORE, reference == UNRANKED_SCORE)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.fixture(scope="module")
def reference(model, inputs):
    return per_query_scores(model, *inputs, k_test=K_TEST)


def test_scores_equal_the_originals_per_query_loop(model, inputs, reference):
    score_i2t, score_t2i = retrieval_scores(model, *inputs, k_test=K_TEST)
    assert score_i2t.shape == (7, 19) and score_t2i.shape == (19, 7)
    assert_same_scores(score_i2t, reference[0])
    assert_same_scores(score_t2i, reference[1])


def test_only_each_querys_top_k_is_scored_the_rest_is_minus_100(model, inputs):
    score_i2t, score_t2i = retrieval_scores(model, *inputs, k_test=K_TEST)
    assert ((score_i2t != UNRANKED_SCORE).sum(dim=1) == K_TEST).all()
    assert ((score_t2i != UNRANKED_SCORE).sum(dim=1) == K_TEST).all()
    # The scored cells are each query's best ITC candidates.
    pixel_values, input_ids, attention_mask = inputs
    similarity = model.get_image_features(pixel_values) @ model.get_text_features(input_ids, attention_mask).t()
    expected = torch.zeros_like(similarity, dtype=torch.bool).scatter_(1, similarity.topk(K_TEST, dim=1).indices, True)
    assert torch.equal(score_i2t != UNRANKED_SCORE, expected)


def test_k_beyond_the_candidates_scores_every_pair(model, inputs):
    score_i2t, score_t2i = retrieval_scores(model, *inputs, k_test=50)  # 7 images, 19 texts
    assert (score_i2t != UNRANKED_SCORE).all() and (score_t2i != UNRANKED_SCORE).all()
    reference_i2t, reference_t2i = per_query_scores(model, *inputs, k_test=50)
    assert_same_scores(score_i2t, reference_i2t)
    assert_same_scores(score_t2i, reference_t2i)
    # Every pair is re-ranked both ways with the same score.
    torch.testing.assert_close(score_i2t, score_t2i.t(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch_size, max_pairs_per_forward", [(1, 1), (3, 4), (2, 37), (64, 100_000)])
def test_chunk_sizes_do_not_change_the_scores(model, inputs, reference, batch_size, max_pairs_per_forward):
    scores = retrieval_scores(
        model, *inputs, k_test=K_TEST, batch_size=batch_size, max_pairs_per_forward=max_pairs_per_forward
    )
    assert_same_scores(scores[0], reference[0])
    assert_same_scores(scores[1], reference[1])


def test_images_may_be_a_sequence_read_item_by_item(model, inputs, reference):
    pixel_values, input_ids, attention_mask = inputs
    scores = retrieval_scores(model, list(pixel_values), input_ids, attention_mask, k_test=K_TEST)
    assert_same_scores(scores[0], reference[0])


def test_a_training_model_is_scored_in_eval_mode_and_left_training():
    model = make_model()
    model.config.text_config.attention_probs_dropout_prob = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    first = retrieval_scores(model, *make_inputs(), k_test=K_TEST)
    second = retrieval_scores(model, *make_inputs(), k_test=K_TEST)
    assert model.training
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_bad_arguments_are_named(model, inputs):
    pixel_values, input_ids, attention_mask = inputs
    with pytest.raises(ValueError, match="k_test"):
        retrieval_scores(model, *inputs, k_test=0)
    with pytest.raises(ValueError, match="max_pairs_per_forward"):
        retrieval_scores(model, *inputs, max_pairs_per_forward=0)
    with pytest.raises(ValueError, match="attention_mask"):
        retrieval_scores(model, pixel_values, input_ids, attention_mask[:, :4])
    with pytest.raises(ValueError, match="pixel_values"):
        retrieval_scores(model, pixel_values[:0], input_ids, attention_mask)
    with pytest.raises(TypeError, match="itm_head"):
        retrieval_scores(BlipModel(model.config), *inputs)


def test_evaluate_retrieval_gives_recall_of_the_re_ranked_scores(model, tokenizer, processor):
    rows = [{"image": random_image(i), "captions": [f"a red square {i}", "a blue circle"]} for i in range(4)]

    def transform(image):
        return processor.image_processor(image, return_tensors="pt")["pixel_values"][0]

    metrics = evaluate_retrieval(model, rows, tokenizer, transform, k_test=3, ks=(1, 2))
    encoded = tokenizer(
        [caption for row in rows for caption in row["captions"]], padding="longest", return_tensors="pt"
    )
    pixel_values = torch.stack([transform(row["image"]) for row in rows])
    scores = retrieval_scores(model, pixel_values, encoded["input_ids"], encoded["attention_mask"], k_test=3)
    assert metrics == retrieval_recall(*scores, [0, 0, 1, 1, 2, 2, 3, 3], ks=(1, 2))
    with pytest.raises(ValueError, match="captions"):
        evaluate_retrieval(model, [{"image": rows[0]["image"], "captions": "one string"}], tokenizer, transform)


def test_two_processes_return_the_matrices_of_one(model, inputs, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = retrieval_scores(model, *inputs, k_test=K_TEST)
    for rank in range(2):
        score_i2t, score_t2i = torch.load(tmp_path / f"rank{rank}.pt")
        assert_same_scores(score_i2t, expected[0])
        assert_same_scores(score_t2i, expected[1])


def test_a_one_layer_text_model_scores_like_the_loop(inputs):
    config = make_config()
    config.text_config.num_hidden_layers = 1  # the last layer is also the first
    torch.manual_seed(0)
    model = BlipForImageTextRetrieval(config).eval()
    scores = retrieval_scores(model, *inputs, k_test=K_TEST)
    reference = per_query_scores(model, *inputs, k_test=K_TEST)
    assert_same_scores(scores[0], reference[0])
    assert_same_scores(scores[1], reference[1])
