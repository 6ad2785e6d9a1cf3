"""`make demo`'s report: the report step run on the session's tiny pretraining (`pretrained_tiny`, the same run as
the demo's), its metrics held to thresholds, every image it shows on disk; and the pieces it is made of: caption
scoring with the benchmark's synonyms, the training curves, the atomic writes."""

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from transformers_blip.evaluation.vqa_accuracy import vqa_question_accuracy
from transformers_blip.report import (
    CaptionResult,
    DemoResults,
    demo_results,
    named_attributes,
    score_caption,
    summary_metrics,
    training_curves,
    write_report,
)

NUM_IMAGES = 32
NUM_QUESTIONS = 6


@pytest.fixture(scope="module")
def report(pretrained_tiny, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("demo")
    results = demo_results(
        pretrained_tiny, output_dir, num_images=NUM_IMAGES, num_questions=NUM_QUESTIONS, progress=False
    )
    page = write_report(results, pretrained_tiny / "trainer_state.json", output_dir / "report")
    return results, page


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_the_reports_captions_name_what_is_in_the_image(report):
    results, _ = report
    metrics = results.metrics
    assert len(results.captions) == NUM_IMAGES
    print("\nreport metrics:", json.dumps(metrics, indent=1))
    # The pretraining's decoder grounds colours well and shapes less so (it favours "triangle"): docs/results.md.
    assert metrics["caption_attribute_precision"] >= 70
    assert metrics["caption_colour_precision"] >= 85
    assert metrics["captions_with_right_colours"] >= 75
    assert metrics["captions_without_wrong_attributes"] >= 35


def test_the_reports_search_and_recall_beat_chance(report):
    results, _ = report
    metrics = results.metrics
    assert metrics["text_to_image_chance_r1"] == pytest.approx(100 / NUM_IMAGES)
    assert metrics["text_to_image_r1"] >= 3 * metrics["text_to_image_chance_r1"]
    assert metrics["text_to_image_r5"] >= 75
    assert metrics["pretraining_itc_txt_r1"] >= 10 * metrics["pretraining_itc_chance_r1"]
    for row in results.retrieval:
        assert len(row.hits) == 5 and 1 <= row.target_rank <= NUM_IMAGES
        assert (row.target_rank == 1) == (row.hits[0][0] == row.target)


def test_the_reports_answers_are_scored_against_the_humans(report):
    results, _ = report
    assert len(results.answers) == NUM_QUESTIONS
    for row in results.answers:
        assert row.answer and len(row.human_answers) == 10
        assert row.accuracy == pytest.approx(vqa_question_accuracy(row.answer, row.human_answers))
    expected = 100 * sum(row.accuracy for row in results.answers) / NUM_QUESTIONS
    assert results.metrics["vqa_accuracy"] == pytest.approx(expected)


def test_every_image_of_the_page_exists_and_the_metrics_are_saved_beside_it(report):
    results, page = report
    parser = _Sources()
    parser.feed(page.read_text())
    assert {"losses.png", "learning_rate.png"} <= set(parser.sources)
    assert len(parser.sources) >= NUM_IMAGES + NUM_QUESTIONS + 2
    for source in set(parser.sources):
        with Image.open(page.parent / source) as image:
            image.verify()
    with Image.open(page.parent / "losses.png") as plot:
        assert plot.width > 600 and plot.height > 200  # three panels side by side
    assert json.loads((page.parent / "metrics.json").read_text()) == pytest.approx(results.metrics)
    assert not [path for path in page.parent.rglob("*") if ".partial-" in path.name]


def test_named_attributes_read_the_benchmarks_synonyms_and_plurals():
    assert named_attributes("a big violet plus sign and two small disks") == {"purple", "cross", "circle"}
    assert named_attributes("red boxes above a rhombus and two crosses") == {"red", "square", "diamond", "cross"}
    assert named_attributes("crossing the redwood") == set()  # whole words only
    assert named_attributes("") == set()


def test_a_caption_is_wrong_where_no_reference_names_what_it_names():
    references = ["a large purple cross on a plain background", "a big violet plus sign"]
    assert score_caption("a purple cross", references) == (["cross", "purple"], [])
    assert score_caption("a green plus sign and a purple box", references) == (
        ["cross", "green", "purple", "square"],
        ["green", "square"],
    )
    captions = DemoResults()
    captions.captions = [
        CaptionResult("a.png", "a purple cross", references, ["cross", "purple"], []),
        CaptionResult("b.png", "a green box", references, ["green", "square"], ["green", "square"]),
        CaptionResult("c.png", "a shape", references, [], []),  # names nothing: not counted as right
    ]
    metrics = summary_metrics(captions)
    assert metrics["caption_attribute_precision"] == pytest.approx(50.0)
    assert metrics["captions_without_wrong_attributes"] == pytest.approx(100 / 3)
    assert metrics["caption_colour_precision"] == pytest.approx(50.0)  # purple right, green wrong
    assert metrics["caption_shape_precision"] == pytest.approx(50.0)  # cross right, square wrong
    assert metrics["captions_with_right_colours"] == pytest.approx(100 / 3)


def test_training_curves_come_from_the_trainers_log_history(tmp_path):
    history = [
        {"step": step, "loss_itc": 3 - step / 100, "loss_itm": 0.64, "loss_lm": 5 - step / 50, "learning_rate": 1e-3}
        for step in (10, 20, 30)
    ] + [{"step": 30, "train_runtime": 12.0}]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history}))
    curves = training_curves(state)
    assert curves["loss_itc"] == ([10, 20, 30], [2.9, 2.8, 2.7])
    assert curves["learning_rate"][1] == [1e-3] * 3

    state.write_text(json.dumps({"log_history": [{"step": 1, "loss": 1.0}]}))
    with pytest.raises(ValueError, match="no 'loss_itc'"):
        training_curves(state)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "missing.json"))):
        training_curves(tmp_path / "missing.json")


def test_a_report_without_a_usable_log_writes_nothing(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text("{not json")
    with pytest.raises(ValueError, match="trainer_state.json"):
        write_report(DemoResults(), state, tmp_path / "report")
    assert not Path(tmp_path / "report").exists()
