"""Loader details beyond the round trip: ids, BLIP's VQA weights, bad records in JSON files, parquet and folders."""

import json
from collections import Counter

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from transformers_blip.data import (
    BadSampleError,
    SkipReport,
    load_caption_json,
    load_coco_karpathy,
    load_image,
    load_image_folder,
    load_nlvr,
    load_parquet,
    load_vqa,
    stable_id,
    vqa_answer_weights,
)


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def test_karpathy_ids_from_image_id_or_file_name(tmp_path):
    train = write_json(
        tmp_path / "train.json",
        [
            {
                "image": "val2014/COCO_val2014_000000391895.jpg",
                "caption": "A man. On a bike!",
                "image_id": "coco_391895",
            },
            {"image": "val2014/COCO_val2014_000000522418.jpg", "caption": "A woman", "image_id": "coco_522418"},
            {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": "A bike", "image_id": "coco_391895"},
        ],
    )
    image = "val2014/COCO_val2014_000000391895.jpg"
    test = write_json(tmp_path / "test.json", [{"image": image, "caption": ["one", "two"]}])
    loaded = load_coco_karpathy(train, "/coco")
    assert loaded["caption"] == ["a man on a bike", "a woman", "a bike"]
    assert loaded["image_id"] == [stable_id("coco_391895"), stable_id("coco_522418"), stable_id("coco_391895")]
    assert loaded[0]["image"] == {"bytes": None, "path": "/coco/val2014/COCO_val2014_000000391895.jpg"}
    assert load_coco_karpathy(test, "/coco")[0]["image_id"] == stable_id(image)  # no image_id: the path as written


def test_karpathy_ids_without_numbers_stay_equal_where_equal(tmp_path):
    records = [{"image": f"{name}.jpg", "caption": "x", "image_id": name} for name in ("dog", "cat", "dog")]
    ids = load_coco_karpathy(write_json(tmp_path / "a.json", records), tmp_path)["image_id"]
    assert ids[0] == ids[2] != ids[1]


def test_vqa_weights_as_blip_computes_them(tmp_path):
    records = [
        {"question_id": 7, "question": "What color?", "answer": ["red"] * 6 + ["pink"] * 4, "image": "a.jpg"},
        {"question_id": 8, "question": "What is it?", "answer": "a dog", "image": "v.jpg", "dataset": "vg"},
        {"question_id": 9, "question": "Where?", "image": "b.jpg", "dataset": "vqa"},  # a test question
    ]
    loaded = load_vqa(write_json(tmp_path / "vqa.json", records), "/coco", vg_image_root="/vg")
    assert loaded[0]["unique_answers"] == ["red", "pink"] and loaded[0]["answer_weights"] == [0.6, 0.4]
    assert loaded[1]["answers"] == ["a dog"] and loaded[1]["answer_weights"] == [0.2]
    assert loaded[1]["image"]["path"] == "/vg/v.jpg" and loaded[0]["image"]["path"] == "/coco/a.jpg"
    assert loaded[2]["answers"] == [] and loaded[2]["question"] == "where?"
    assert vqa_answer_weights(["a", "b", "a", "a"]) == (["a", "b"], [0.75, 0.25])


def test_nlvr_labels_and_bad_records(tmp_path):
    records = [
        {"images": ["l.png", "r.png"], "sentence": "The left image has two dogs.", "label": "True"},
        {"images": ["l.png", "r.png"], "sentence": "No dogs.", "label": "False"},
        {"images": ["only_one.png"], "sentence": "x", "label": "True"},
        {"images": ["l.png", "r.png"], "sentence": "x", "label": "maybe"},
    ]
    report = SkipReport(tmp_path / "skips")
    loaded = load_nlvr(write_json(tmp_path / "nlvr.json", records), "/nlvr", report=report)
    assert loaded["label"] == [1, 0] and loaded["sentence"][0] == "the left image has two dogs"
    assert report.counts() == {"missing_field": 2}


def test_one_bad_record_of_a_json_list_costs_only_itself(tmp_path):
    path = tmp_path / "pretrain.json"
    good = json.dumps({"image": "a.jpg", "caption": "fine"}).encode()
    bad = b'{"image": "b.jpg", "caption": "caf\xe9"}'
    wrong_type = json.dumps({"image": 12, "caption": "a number for a path"}).encode()
    path.write_bytes(b"[" + b", ".join([good, bad, wrong_type, good]) + b"]")
    report = SkipReport(tmp_path / "skips")
    loaded = load_caption_json(path, report=report)
    assert loaded["caption"] == ["fine", "fine"]
    assert report.counts() == {"bad_text_encoding": 1, "missing_field": 1}
    assert {entry.source for entry in report.skipped} == {f"{path}:1", f"{path}:2"}


def test_malformed_json_list_is_skipped_whole_and_counted(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.jpg", "caption": "x"},')
    good = write_json(tmp_path / "good.json", [{"image": "b.jpg", "caption": "y"}])
    report = SkipReport(tmp_path / "skips")
    assert load_caption_json([broken, good], report=report)["caption"] == ["y"]
    assert [(entry.source, entry.reason) for entry in report.skipped] == [(str(broken), "malformed_json")]
    with pytest.raises(BadSampleError, match=r"broken\.json: malformed_json"):
        load_caption_json([broken, good], report=SkipReport(strict=True))


def test_missing_annotation_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_caption_json(tmp_path / "typo.json")


def test_jsonl_pretraining_list_and_extra_fields(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "x", "url": "http://a"}\n\n{"image": "b.jpg", "caption": "y"}\n')
    loaded = load_caption_json(path, image_root="/img", extra_fields=("url",))
    assert loaded["url"] == ["http://a", None] and loaded[1]["image"]["path"] == "/img/b.jpg"


def test_image_folder_without_metadata_lists_images(tmp_path):
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    loaded = load_image_folder(tmp_path)
    assert [row["image"]["path"] for row in loaded] == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]


def test_parquet_skips_broken_files_and_empty_captions(tmp_path):
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    data = Dataset.from_dict({"image": [image, image, image], "caption": ["A frog.", "  ", "Grass!"]})
    data = data.cast_column("image", ImageFeature())
    data.to_parquet(str(tmp_path / "good.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    report = SkipReport(tmp_path / "skips")
    files = [tmp_path / "good.parquet", tmp_path / "broken.parquet"]
    loaded = load_parquet(files, cache_dir=tmp_path / "cache", report=report)
    assert loaded["caption"] == ["a frog", "grass"]
    assert np.array_equal(np.asarray(load_image(loaded[1]["image"])), np.asarray(image))
    assert Counter(entry.reason for entry in report.skipped) == {"broken_shard": 1, "empty_caption": 1}
    assert {entry.source for entry in report.skipped} == {str(files[1]), f"{files[0]}:1"}


def test_parquet_files_without_rows_add_nothing(tmp_path):
    # A CapFilt shard whose every text was dropped is a valid parquet file of no rows.
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    data = Dataset.from_dict({"image": [image], "caption": ["A frog."]}).cast_column("image", ImageFeature())
    data.to_parquet(str(tmp_path / "one.parquet"))
    data.select([]).to_parquet(str(tmp_path / "none.parquet"))
    files = [tmp_path / "none.parquet", tmp_path / "one.parquet", tmp_path / "none.parquet"]
    loaded = load_parquet(files, cache_dir=tmp_path / "cache", report=SkipReport(tmp_path / "skips"))
    assert loaded["caption"] == ["a frog"]
    empty = load_parquet([tmp_path / "none.parquet"], cache_dir=tmp_path / "cache", report=SkipReport())
    assert len(empty) == 0 and {"image", "caption"} <= set(empty.column_names)
