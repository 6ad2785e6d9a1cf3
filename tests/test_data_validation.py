"""What the loaders refuse before any image is read: text without words, records of the wrong shape, files whose top
level is not a list, image paths outside their folder; and image ids that stay distinct across files and sources."""

import json

import pytest
from conftest import make_tokenizer, random_image
from datasets import concatenate_datasets

from transformers_blip.data import (
    BadSampleError,
    BlipEvalTransform,
    SkipReport,
    load_caption_json,
    load_coco_karpathy,
    load_image_folder,
    load_nlvr,
    load_vqa,
    pre_caption,
    pre_question,
    stable_id,
)
from transformers_blip.training import ImageTextCollator


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_metadata(folder, records):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    return folder


def skips(report):
    return [(entry.source, entry.reason) for entry in report.skipped]


# ---------------------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------------------

INVISIBLE = {
    "tab": "\t",
    "carriage return": "\r",
    "no-break space": "\u00a0",
    "ideographic space": "\u3000",
    "zero-width space": "\u200b",
    "byte order mark": "\ufeff",
    "NUL": "\x00\x00",
    "a mixture": "\t\u200b\r\n\u00a0\x00 \u3000",
}


@pytest.mark.parametrize("text", INVISIBLE.values(), ids=INVISIBLE.keys())
def test_a_caption_of_invisible_characters_has_no_words(text, tmp_path):
    assert pre_caption(text) == "" and pre_question(text) == ""
    path = write_json(
        tmp_path / "pairs.json", [{"image": "a.png", "caption": text}, {"image": "b.png", "caption": "b"}]
    )
    report = SkipReport(tmp_path / "skips")
    assert load_caption_json(path, report=report)["caption"] == ["b"]
    assert skips(report) == [(f"{path}:0", "empty_caption")]


def test_invisible_characters_inside_a_caption_leave_its_words_as_the_tokenizer_sees_them():
    tokenizer = make_tokenizer()
    text = "a\u00a0red\u200b square\tleft\r\nof\u3000a\x00 circle"
    cleaned = pre_caption(text)
    assert cleaned == "a red square left of a circle"
    assert tokenizer(cleaned)["input_ids"] == tokenizer(text.lower())["input_ids"]
    assert pre_caption("A Dog (running) on the beach!") == "a dog running on the beach"  # BLIP's cleaning stays


def test_a_metadata_line_without_the_caption_other_lines_have_is_skipped(tmp_path):
    folder = write_metadata(
        tmp_path / "data",
        [{"file_name": "a.png", "caption": "A cat."}, {"file_name": "b.png"}, {"file_name": "c.png", "caption": None}],
    )
    report = SkipReport(tmp_path / "skips")
    loaded = load_image_folder(folder, report=report)
    assert loaded["caption"] == ["a cat"]
    metadata = folder / "metadata.jsonl"
    assert sorted(skips(report)) == [(f"{metadata}:2", "missing_field"), (f"{metadata}:3", "missing_field")]
    with pytest.raises(BadSampleError, match=r"metadata\.jsonl:\d: missing_field"):
        load_image_folder(folder, report=SkipReport(tmp_path / "strict", strict=True))


@pytest.mark.parametrize("captions", [5, {"en": "a cat"}, True])
def test_metadata_captions_that_are_not_a_list_are_skipped(captions, tmp_path):
    records = [{"file_name": "a.png", "captions": ["A cat."]}, {"file_name": "b.png", "captions": captions}]
    folder = write_metadata(tmp_path / "data", records)
    report = SkipReport(tmp_path / "skips")
    assert load_image_folder(folder, report=report)["captions"] == [["a cat"]]
    assert skips(report) == [(f"{folder / 'metadata.jsonl'}:2", "missing_field")]


def test_metadata_without_any_text_field_is_not_refused(tmp_path):
    folder = write_metadata(tmp_path / "data", [{"file_name": "a.png", "label": 1}, {"file_name": "b.png"}])
    assert load_image_folder(folder)["label"] == [1, None]


@pytest.mark.parametrize("lists_first", [False, True])
def test_a_coco_record_of_the_other_caption_layout_is_skipped(lists_first, tmp_path):
    usual, odd = ("A dog.", ["one", "two"]) if not lists_first else (["one", "two"], "A dog.")
    records = [{"image": f"{i}.jpg", "caption": caption} for i, caption in enumerate([odd, usual, usual, usual])]
    path = write_json(tmp_path / "coco.json", records)
    report = SkipReport(tmp_path / "skips")
    loaded = load_coco_karpathy(path, tmp_path, report=report)
    assert len(loaded) == 3 and skips(report) == [(f"{path}:0", "missing_field")]
    column = "captions" if lists_first else "caption"
    assert set(loaded.column_names) == {"image", column, "image_id"} and None not in loaded[column]


TOP_LEVELS = {"an object without a list": '{"info": {"year": 2014}}', "a number": "7", "a string": '"a.jpg"'}
TOP_LEVELS |= {"null": "null", "an object with two lists": '{"images": [], "annotations": []}', "empty": ""}


@pytest.mark.parametrize("text", TOP_LEVELS.values(), ids=TOP_LEVELS.keys())
def test_a_json_file_whose_top_level_is_not_a_list_is_one_unreadable_file(text, tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(text)
    report = SkipReport(tmp_path / "skips")
    assert len(load_caption_json(path, report=report)) == 0
    assert [(entry.source, entry.reason) for entry in report.unreadable_files] == [(str(path), "malformed_json")]
    assert not report.counts()  # a file, not a sample
    with pytest.raises(BadSampleError, match=r"pairs\.json: malformed_json"):
        load_caption_json(path, report=SkipReport(tmp_path / "strict", strict=True))


def test_a_list_that_does_not_parse_is_named_as_a_file_not_counted_as_one_sample(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps([{"image": f"{i}.png", "caption": "x"} for i in range(1000)])[:-1] + ",]")
    report = SkipReport(tmp_path / "skips")
    load_caption_json(
        [broken, write_json(tmp_path / "good.json", [{"image": "a.png", "caption": "y"}])], report=report
    )
    summary = report.summary()
    assert summary.startswith("Skipped no samples. Could not read 1 file to the end")
    assert f"{broken} (malformed_json)" in summary
    assert [entry.whole_file for entry in report.skipped] == [True]


def test_the_summary_names_a_few_unreadable_files_and_counts_the_rest(tmp_path):
    report = SkipReport(tmp_path / "skips")
    for index in range(7):
        path = tmp_path / f"broken{index}.json"
        path.write_text("[")
        load_caption_json(path, report=report)
    load_caption_json(write_json(tmp_path / "one.json", [{"image": "a.png", "caption": "..."}]), report=report)
    summary = report.summary()
    assert summary.startswith("Skipped 1 sample: 1 empty_caption. Could not read 7 files to the end")
    assert summary.endswith("and 2 more.") and summary.count("(malformed_json)") == 5


def make_loader_inputs(tmp_path, name):
    """A file for one of the five annotation loaders: one good record, then records that are not JSON objects."""
    good = {
        "caption_json": {"image": "a.png", "caption": "a cat"},
        "coco_karpathy": {"image": "a.png", "caption": "a cat", "image_id": "coco_1"},
        "vqa": {"image": "a.png", "question": "What?", "answer": ["cat"], "question_id": 1},
        "nlvr": {"images": ["a.png", "b.png"], "sentence": "Two cats.", "label": "True"},
        "image_folder": {"file_name": "a.png", "caption": "a cat"},
    }[name]
    records = [good, "a.png", 7, None, ["a.png", "a cat"]]
    if name == "image_folder":
        folder = tmp_path / "folder"
        folder.mkdir()
        (folder / "metadata.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
        sources = [f"{folder / 'metadata.jsonl'}:{line}" for line in (2, 3, 4, 5)]
        return folder, sources
    path = write_json(tmp_path / f"{name}.json", records)
    return path, [f"{path}:{index}" for index in (1, 2, 3, 4)]


LOADERS = {
    "caption_json": lambda path, report: load_caption_json(path, report=report),
    "coco_karpathy": lambda path, report: load_coco_karpathy(path, "/images", report=report),
    "vqa": lambda path, report: load_vqa(path, "/images", report=report),
    "nlvr": lambda path, report: load_nlvr(path, "/images", report=report),
    "image_folder": lambda path, report: load_image_folder(path, report=report),
}


@pytest.mark.parametrize("name", LOADERS)
def test_every_annotation_loader_skips_records_that_are_not_objects_alike(name, tmp_path, caplog):
    path, bad_sources = make_loader_inputs(tmp_path, name)
    report = SkipReport(tmp_path / "skips")
    assert len(LOADERS[name](path, report)) == 1
    assert skips(report) == [(source, "malformed_json") for source in bad_sources]
    assert f"skipped {len(bad_sources)} records" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Image ids
# ---------------------------------------------------------------------------------------------------------------


def test_ids_of_different_datasets_stay_distinct_and_equal_ids_stay_equal(tmp_path):
    coco = write_json(
        tmp_path / "coco.json",
        [
            {"image": "c.jpg", "caption": "a", "image_id": "coco_391895"},
            {"image": "d.jpg", "caption": "b", "image_id": 5},
        ],
    )
    flickr = write_json(
        tmp_path / "flickr.json",
        [
            {"image": "f.jpg", "caption": "c", "image_id": "flickr_391895"},
            {"image": "g.jpg", "caption": "d", "image_id": 5},
        ],
    )
    more_coco = write_json(tmp_path / "more.json", [{"image": "c.jpg", "caption": "e", "image_id": "coco_391895"}])
    ids = concatenate_datasets([load_coco_karpathy(path, tmp_path) for path in (coco, flickr, more_coco)])["image_id"]
    assert ids[0] != ids[2]  # coco_391895 and flickr_391895
    assert ids[0] == ids[4]  # coco_391895 in two files
    assert ids[1] == ids[3] == 5  # integer ids are kept as they are


def test_one_id_without_digits_leaves_the_other_ids_alone(tmp_path):
    plain = write_json(tmp_path / "plain.json", [{"image": "a.jpg", "caption": "a", "image_id": "coco_7"}])
    mixed = write_json(
        tmp_path / "mixed.json",
        [
            {"image": "a.jpg", "caption": "a", "image_id": "coco_7"},
            {"image": "b.jpg", "caption": "b", "image_id": "x"},
        ],
    )
    assert load_coco_karpathy(plain, tmp_path)["image_id"][0] == load_coco_karpathy(mixed, tmp_path)["image_id"][0]


def test_stable_ids():
    assert stable_id(391895) == stable_id("391895") == 391895
    assert len({stable_id(value) for value in ("7", 7, "007", "coco_7", "flickr_7", "7.jpg", -7)}) == 6
    assert all(0 <= stable_id(value) < 2**63 for value in ("coco_7", -7, 2**70, 3.5, "é"))


def test_vqa_question_ids_stay_the_numbers_the_evaluation_server_expects(tmp_path):
    ids = (262148000, 9, None, None)  # questions without an id get one from their place in the file
    records = [{"image": "a.png", "question": "What?", "answer": ["x"], "question_id": qid} for qid in ids]
    loaded = load_vqa(write_json(tmp_path / "vqa.json", records), "/coco")["question_id"]
    assert loaded[:2] == [262148000, 9] and len(set(loaded)) == 4


def test_vqa_answers_that_are_neither_a_text_nor_a_list_are_skipped(tmp_path):
    records = [
        {"image": "a.png", "question": "What?", "answer": answer, "question_id": i}
        for i, answer in enumerate([["red"], 7, {"red": 1}, None])
    ]
    path = write_json(tmp_path / "vqa.json", records)
    report = SkipReport(tmp_path / "skips")
    assert load_vqa(path, "/coco", report=report)["answers"] == [["red"], []]  # None: a test question
    assert skips(report) == [(f"{path}:1", "missing_field"), (f"{path}:2", "missing_field")]


def test_the_collator_maps_string_image_ids_to_distinct_numbers():
    keys = ["coco_1", "flickr_1", "coco_1", 12]
    collator = ImageTextCollator(make_tokenizer(), BlipEvalTransform(32), image_id_column="image_id")
    rows = [{"image": random_image(i), "caption": "a cat", "image_id": key} for i, key in enumerate(keys)]
    image_ids = collator(rows)["image_ids"].tolist()
    assert image_ids == [stable_id(key) for key in keys]
    assert image_ids[0] == image_ids[2] != image_ids[1] and image_ids[3] == 12


# ---------------------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------------------

OUTSIDE = ["../../etc/hostname", "/etc/hostname", "sub/../../outside.png", ".."]


def test_a_file_name_outside_the_image_folder_is_refused(tmp_path):
    records = [{"file_name": name, "caption": "a cat"} for name in ["a.png", *OUTSIDE, "sub/../b.png", "./c.png"]]
    folder = write_metadata(tmp_path / "data", records)
    report = SkipReport(tmp_path / "skips")
    loaded = load_image_folder(folder, report=report)
    assert [row["image"]["path"] for row in loaded] == [
        str(folder / name) for name in ("a.png", "sub/../b.png", "./c.png")
    ]
    metadata = folder / "metadata.jsonl"
    assert skips(report) == [(f"{metadata}:{line}", "unsafe_path") for line in range(2, 2 + len(OUTSIDE))]
    with pytest.raises(BadSampleError, match=r"metadata\.jsonl:2: unsafe_path"):
        load_image_folder(folder, report=SkipReport(tmp_path / "strict", strict=True))


def test_an_empty_file_name_is_a_missing_field(tmp_path):
    folder = write_metadata(
        tmp_path / "data", [{"file_name": "", "caption": "x"}, {"file_name": "a.png", "caption": "y"}]
    )
    report = SkipReport(tmp_path / "skips")
    assert load_image_folder(folder, report=report)["caption"] == ["y"]
    assert report.counts() == {"missing_field": 1}


def test_a_field_of_mixed_types_is_an_error_naming_the_file_and_the_field(tmp_path):
    folder = write_metadata(
        tmp_path / "data",
        [{"file_name": "a.png", "caption": "x", "score": 1}, {"file_name": "b.png", "caption": "y", "score": "high"}],
    )
    with pytest.raises(ValueError, match=r"metadata\.jsonl: the field 'score' holds values of types \['int', 'str'\]"):
        load_image_folder(folder)
