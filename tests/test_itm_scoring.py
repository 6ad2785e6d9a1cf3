"""The one image-text scorer: ITM match probabilities and ITC similarities, grouped texts per image, the same score
whatever batch a text is scored in."""

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image

from transformers_blip import BlipForImageTextRetrieval, BlipModel, build_processor
from transformers_blip.itm_scoring import itm_match_probabilities, score_texts

TEXTS = [["a red circle", "two blue squares"], ["a green triangle", "a red circle"]]


@pytest.fixture(scope="module")
def retrieval():
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(make_config()).eval(), build_processor(make_tokenizer(), image_size=32)


@pytest.fixture(scope="module")
def pixel_values(retrieval):
    _, processor = retrieval
    images = [random_image(index) for index in range(2)]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (2, 3, 32, 32)


def test_scores_are_the_models_own_for_each_pair(retrieval, pixel_values):
    model, processor = retrieval
    itm, itc = score_texts(model, processor.tokenizer, pixel_values, TEXTS)
    assert itm.shape == itc.shape == (2, 2) and itm.dtype == itc.dtype == torch.float32
    for image, texts in enumerate(TEXTS):
        for position, text in enumerate(texts):
            tokens = processor.tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                output = model(input_ids=tokens["input_ids"], pixel_values=pixel_values[image : image + 1])
            assert float(itm[image, position]) == pytest.approx(float(output.itm_score), abs=1e-5)
            assert float(itc[image, position]) == pytest.approx(float(output.itc_similarity[0, 0]), abs=1e-5)


def test_a_score_does_not_depend_on_the_batch_it_was_scored_in(retrieval, pixel_values):
    model, processor = retrieval
    itm, itc = score_texts(model, processor.tokenizer, pixel_values, TEXTS)
    alone_itm, alone_itc = score_texts(model, processor.tokenizer, pixel_values[1:], [TEXTS[1][1:]])
    assert float(alone_itm[0, 0]) == pytest.approx(float(itm[1, 1]), abs=1e-6)
    assert float(alone_itc[0, 0]) == pytest.approx(float(itc[1, 1]), abs=1e-6)


def test_match_probabilities_take_texts_grouped_by_image_and_clean_them(retrieval, pixel_values):
    model, processor = retrieval
    itm, _ = score_texts(model, processor.tokenizer, pixel_values, TEXTS)
    flat = itm_match_probabilities(model, processor, pixel_values, ["A  Red circle!!", *TEXTS[0][1:], *TEXTS[1]])
    torch.testing.assert_close(flat, itm.flatten(), atol=1e-6, rtol=0)


def test_refusals_name_what_is_wrong(retrieval, pixel_values):
    model, processor = retrieval
    with pytest.raises(ValueError, match="3 texts do not group evenly over 2 images"):
        itm_match_probabilities(model, processor, pixel_values, ["a", "b", "c"])
    with pytest.raises(ValueError, match="the same number of texts for every image"):
        score_texts(model, processor.tokenizer, pixel_values, [["a"], ["b", "c"]])
    with pytest.raises(ValueError, match="one sequence of texts per image: 1 for 2 images"):
        score_texts(model, processor.tokenizer, pixel_values, [["a", "b"]])
    with pytest.raises(ValueError, match="BlipModel has no ITM head"):
        score_texts(BlipModel(make_config()), processor.tokenizer, pixel_values, TEXTS)
