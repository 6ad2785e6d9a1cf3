"""The synthetic benchmark survives every real format: exported, then read back by the loaders, record for record."""

import json

import numpy as np
import pytest
from datasets import concatenate_datasets

from transformers_blip.benchmark import build_synthetic_benchmark, export_benchmark
from transformers_blip.data import (
    SkipReport,
    flatten_captions,
    load_caption_json,
    load_coco_karpathy,
    load_image,
    load_image_folder,
    load_nlvr,
    load_parquet,
    load_vqa,
    load_webdataset,
    stream_parquet,
    vqa_answer_list,
)

IMAGE_COLUMNS = ("image", "image0", "image1")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    benchmark = build_synthetic_benchmark(
        seed=11, image_size=32, num_human=6, num_web=12, num_val=3, num_test=4, num_vqa=9, num_nlvr=4
    )
    root = tmp_path_factory.mktemp("export")
    files = export_benchmark(benchmark, root, shard_size=7)
    return benchmark, root, files


@pytest.fixture()
def report(tmp_path):
    return SkipReport(tmp_path / "skips", strict=True)  # nothing may be skipped on a clean export


def pixels(value) -> np.ndarray:
    return np.asarray(load_image(value))


def assert_same_records(loaded, expected, columns=None):
    """Same number of rows, same values column by column, images compared on decoded pixels."""
    loaded_rows, expected_rows = list(loaded), list(expected)
    columns = columns or expected.column_names
    assert len(loaded_rows) == len(expected_rows) > 0
    for got, want in zip(loaded_rows, expected_rows):
        for column in columns:
            if column in IMAGE_COLUMNS:
                assert np.array_equal(pixels(got[column]), pixels(want[column])), column
            else:
                assert got[column] == want[column], (column, got[column], want[column])


def test_every_format_was_written(exported):
    _, root, files = exported
    assert set(files) == {"coco_karpathy", "pretrain_json", "imagefolder", "parquet", "webdataset", "vqa", "nlvr"}
    assert len(files["webdataset"]) == 5 + 2  # 30 human pairs and 12 web pairs, in shards of 7
    assert all(path.exists() for paths in files.values() for path in paths)


def test_coco_karpathy(exported, report):
    benchmark, root, _ = exported
    train = load_coco_karpathy(root / "annotations" / "coco_karpathy_train.json", root, report=report)
    human = flatten_captions(benchmark["human"])
    assert_same_records(train, human, columns=["image", "caption"])
    assert_same_images(train["image_id"], human["image_id"])
    for split in ("val", "test"):
        loaded = load_coco_karpathy(root / "annotations" / f"coco_karpathy_{split}.json", root, report=report)
        assert set(loaded.column_names) == {"image", "captions", "image_id"}
        assert_same_records(loaded, benchmark[split], columns=["image", "captions"])
        assert_same_images(loaded["image_id"], benchmark[split]["image_id"])


def assert_same_images(loaded_ids, expected_ids):
    """The loaded ids (stable ids of BLIP's "synthetic_12" or of the file name) name the same images: one to one."""
    pairs = set(zip(loaded_ids, expected_ids))
    assert len(pairs) == len(set(loaded_ids)) == len(set(expected_ids))


def test_pretrain_json_lists(exported, report):
    benchmark, root, _ = exported
    files = [root / "annotations" / "pretrain_human.json", root / "annotations" / "pretrain_web.json"]
    loaded = load_caption_json(files, root, extra_fields=("image_id", "is_noisy", "noise_kind"), report=report)
    human = flatten_captions(benchmark["human"])
    assert_same_records(loaded.select(range(len(human))), human)
    assert_same_records(loaded.select(range(len(human), len(loaded))), benchmark["web"])


@pytest.mark.parametrize("split", ["human", "web", "val", "test"])
def test_image_folder(exported, report, split):
    benchmark, root, _ = exported
    assert_same_records(load_image_folder(root / "imagefolder" / split, report=report), benchmark[split])


@pytest.mark.parametrize("split", ["human", "web", "vqa_train", "nlvr_test"])
def test_parquet(exported, report, split, tmp_path):
    benchmark, root, _ = exported
    caption_column = "caption" if split == "web" else None
    loaded = load_parquet(
        root / "parquet" / f"{split}.parquet",
        image_columns=[c for c in benchmark[split].column_names if c in IMAGE_COLUMNS],
        caption_column=caption_column,
        cache_dir=tmp_path / "cache",
        report=report,
    )
    assert_same_records(loaded, benchmark[split])


def test_parquet_streaming(exported, report):
    benchmark, root, _ = exported
    streamed = stream_parquet(root / "parquet" / "web.parquet", report=report)
    assert_same_records(streamed, benchmark["web"])


def test_load_parquet_refuses_streaming_and_points_at_stream_parquet(exported):
    _, root, _ = exported
    with pytest.raises(ValueError, match="stream_parquet"):
        load_parquet(root / "parquet" / "web.parquet", streaming=True)


def test_webdataset(exported, report):
    benchmark, root, files = exported
    assert [p.name for p in files["webdataset"]][:2] == ["human-00000.tar", "human-00001.tar"]
    streamed = load_webdataset(
        str(root / "webdataset" / "*.tar"), metadata_fields=("image_id", "is_noisy", "noise_kind"), report=report
    )
    pairs = concatenate_datasets([flatten_captions(benchmark["human"]), benchmark["web"]])
    rows = list(streamed)
    human_count = 5 * len(benchmark["human"])
    assert all(row["is_noisy"] is None for row in rows[:human_count])  # human shards carry only the image id
    assert_same_records(rows[:human_count], flatten_captions(benchmark["human"]))
    assert_same_records(rows[human_count:], benchmark["web"])
    assert len(rows) == len(pairs)


def test_vqa(exported, report):
    benchmark, root, _ = exported
    extra = ("image_id", "question_type", "multiple_choice_answer")
    for split in ("vqa_train", "vqa_test"):
        loaded = load_vqa(root / "annotations" / f"{split}.json", root, extra_fields=extra, report=report)
        assert_same_records(loaded, benchmark[split])
    answer_list = json.loads((root / "annotations" / "answer_list.json").read_text())
    assert answer_list == vqa_answer_list(benchmark["vqa_train"])
    assert set(answer_list) == {answer for answers in benchmark["vqa_train"]["answers"] for answer in answers}


def test_nlvr(exported, report):
    benchmark, root, _ = exported
    for split in ("nlvr_train", "nlvr_test"):
        loaded = load_nlvr(
            root / "annotations" / f"{split}.json", root, extra_fields=("image0_id", "image1_id"), report=report
        )
        assert_same_records(loaded, benchmark[split])
