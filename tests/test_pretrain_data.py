"""The pairs a pretraining run reads: one skip report for the run, load-time losses included and counted once; an
empty training set refused naming its inputs; and the script's data arguments."""

import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from conftest import random_image

from transformers_blip.benchmark.export import write_webdataset_shards
from transformers_blip.data import BadSampleError, SkipReport
from transformers_blip.training import load_pretraining_pairs

SCRIPT = Path(__file__).parents[1] / "training_scripts" / "pretrain.py"
CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a small yellow square"]


def write_pairs(root: Path) -> tuple[Path, Path]:
    """Images with a good caption list, and a list of 1000 records that a trailing comma stops from parsing."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for index, caption in enumerate(CAPTIONS):
        random_image(index, size=(32, 32)).save(root / f"{index}.png")
        records.append({"image": f"{index}.png", "caption": caption})
    good = root / "good.json"
    good.write_text(json.dumps(records))
    broken = root / "broken.json"
    broken.write_text(json.dumps([records[0]] * 1000)[:-1] + ",]")
    return good, broken


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    random_image(seed, size=(32, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_list_that_does_not_parse_reaches_the_runs_report(tmp_path):
    good, broken = write_pairs(tmp_path / "data")
    report = SkipReport(tmp_path / "skipped")
    train, held_out = load_pretraining_pairs("caption_json", [str(broken), str(good)], str(good.parent), report=report)
    assert train["caption"] == CAPTIONS and held_out is None
    assert [(entry.source, entry.reason) for entry in report.unreadable_files] == [(str(broken), "malformed_json")]
    assert f"{broken} (malformed_json)" in report.summary()


def test_loading_again_counts_its_losses_once(tmp_path):
    """A resumed run reads its files again; what they lose is counted once, what decoding lost is kept."""
    good, broken = write_pairs(tmp_path / "data")
    report = SkipReport(tmp_path / "skipped")
    files = [str(broken), str(good)]
    load_pretraining_pairs("caption_json", files, report=report)
    report.record(BadSampleError("0.png", "truncated_image"))  # as the decoding workers record
    load_pretraining_pairs("caption_json", files, report=report)
    assert len(report.unreadable_files) == 1 and report.counts() == {"truncated_image": 1}


def test_other_processes_count_nothing_but_stop_in_strict_mode(tmp_path):
    good, broken = write_pairs(tmp_path / "data")
    report = SkipReport(tmp_path / "skipped")
    train, _ = load_pretraining_pairs("caption_json", [str(broken), str(good)], report=report, count_load_skips=False)
    assert len(train) == len(CAPTIONS) and len(report) == 0
    with pytest.raises(BadSampleError, match=r"broken\.json: malformed_json"):
        strict = SkipReport(tmp_path / "strict", strict=True)
        load_pretraining_pairs("caption_json", [str(broken)], report=strict, count_load_skips=False)


def test_broken_webdataset_shards_reach_the_runs_report(tmp_path):
    samples = [(f"k{i}", png_bytes(i), caption, {}) for i, caption in enumerate(CAPTIONS)]
    good = write_webdataset_shards(iter(samples), tmp_path, "good", 10)[0]
    broken = tmp_path / "broken-00000.tar"
    broken.write_bytes(b"not a tar archive" * 50)
    report = SkipReport(tmp_path / "skipped")
    stream, _ = load_pretraining_pairs("webdataset", [str(good), str(broken)], report=report)
    assert sorted(example["caption"] for example in stream) == sorted(CAPTIONS)
    assert [(entry.source, entry.reason) for entry in report.unreadable_files] == [(str(broken), "broken_shard")]


def test_a_pass_over_a_stream_for_the_vocabulary_counts_nothing(tmp_path):
    """The script builds its vocabulary from the training captions: for a stream that pass is not an epoch."""
    broken = tmp_path / "broken-00000.tar"
    broken.write_bytes(b"not a tar archive" * 50)
    report = SkipReport(tmp_path / "skipped")
    stream, _ = load_pretraining_pairs("webdataset", [str(broken)], report=report)
    with report.not_counting():
        assert list(stream["caption"]) == []
    assert len(report) == 0
    list(stream)
    assert [entry.reason for entry in report.unreadable_files] == ["broken_shard"]
    strict = SkipReport(tmp_path / "strict", strict=True)
    with strict.not_counting(), pytest.raises(BadSampleError, match="broken_shard"):
        list(load_pretraining_pairs("webdataset", [str(broken)], report=strict)[0])


def test_an_empty_training_set_is_refused_naming_its_inputs(tmp_path):
    _, broken = write_pairs(tmp_path / "data")
    empty = tmp_path / "data" / "empty.json"
    empty.write_text(json.dumps([{"image": "0.png", "caption": "..."}]))
    with pytest.raises(
        ValueError, match=r"broken\.json, .*empty\.json\) gave no usable image-text pair.*empty_caption"
    ):
        load_pretraining_pairs("caption_json", [str(broken), str(empty)], report=SkipReport(tmp_path / "skipped"))


def test_a_folder_without_captions_is_refused(tmp_path):
    random_image(0, size=(32, 32)).save(tmp_path / "0.png")
    with pytest.raises(ValueError, match=r"'image_folder' source .* has no 'caption' column"):
        load_pretraining_pairs("image_folder", [str(tmp_path)])
    with pytest.raises(ValueError, match="reads one folder; got 2"):
        load_pretraining_pairs("image_folder", [str(tmp_path), str(tmp_path)])


def run_script(monkeypatch, *arguments: str) -> None:
    """`main()` of training_scripts/pretrain.py with these arguments, in this process (no second start-up)."""
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(script)
    common = [
        "--image_size", "32", "--vocab_size", "200", "--max_steps", "1", "--per_device_train_batch_size", "4",
        "--save_strategy", "no", "--disable_tqdm", "true", "--use_cpu", "--report_to", "none",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *common, *arguments])
    script.main()


def test_the_script_reports_what_loading_lost(tmp_path, monkeypatch, capsys):
    good, broken = write_pairs(tmp_path / "data")
    run_script(
        monkeypatch, "--output_dir", str(tmp_path / "run"), "--source", "caption_json",
        "--train_files", str(broken), str(good), "--image_root", str(good.parent),
    )  # fmt: skip
    out = capsys.readouterr().out
    assert f"Could not read 1 file to the end (their unread records are not counted): {broken}" in out
    written = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [(entry["source"], entry["reason"], entry["whole_file"]) for entry in written] == [
        (str(broken), "malformed_json", True)
    ]


def test_the_script_refuses_to_drop_the_columns_its_collator_reads(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(
            monkeypatch, "--output_dir", str(tmp_path), "--remove_unused_columns", "true",
            "--synthetic_num_human", "4", "--synthetic_num_web", "4", "--synthetic_num_test", "2",
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "--remove_unused_columns must stay False" in capsys.readouterr().err


def test_the_script_refuses_image_ids_a_source_does_not_have(tmp_path, monkeypatch, capsys):
    good, _ = write_pairs(tmp_path / "data")
    with pytest.raises(SystemExit) as exit_info:
        run_script(
            monkeypatch, "--output_dir", str(tmp_path / "run"), "--source", "caption_json",
            "--train_files", str(good), "--image_root", str(good.parent), "--use_image_ids", "true",
        )  # fmt: skip
    assert exit_info.value.code == 2
    assert "--use_image_ids needs an image_id column; the caption_json source has ['image', 'caption']" in (
        capsys.readouterr().err
    )
