"""`blip caption`: folders, lists and files captioned in batches, outputs that survive SIGKILL, bad inputs named and
counted, and refusals of what cannot be captioned."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image

from transformers_blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, build_processor
from transformers_blip.cli import main

NUM_IMAGES = 12


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("captioner")
    BlipForConditionalGeneration(make_config()).save_pretrained(directory)
    build_processor(make_tokenizer(), image_size=32).save_pretrained(directory)
    return directory


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for index in range(NUM_IMAGES):
        random_image(index).save(folder / f"img{index:02d}.png")
    random_image(99).save(folder / "nested" / "deep.png")
    (folder / "notes.md").write_text("not an image")
    return folder


def reference_captions(captioner_dir, paths, prompt=None, num_beams=3):
    """The captions that `generate` gives directly, image by image, with the command's defaults."""
    from transformers_blip import BlipImageTextProcessor

    model = BlipForConditionalGeneration.from_pretrained(captioner_dir).eval()
    processor = BlipImageTextProcessor.from_pretrained(captioner_dir)
    captions = {}
    for path in paths:
        inputs = processor(images=random_image_from(path), return_tensors="pt")
        if prompt:
            inputs["input_ids"] = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(**inputs, num_beams=num_beams, min_length=5, max_length=20)
        captions[str(path)] = processor.decode_captions(generated, prompt=prompt)[0]
    return captions


def random_image_from(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_folder_to_jsonl_and_sidecars_equal_direct_generation(captioner_dir, photos, tmp_path, capsys):
    output = tmp_path / "captions.jsonl"
    code = main(
        ["caption", str(photos), "--model", str(captioner_dir), "--output", str(output), "--sidecar", ".txt"]
        + ["--batch-size", "5", "--num-workers", "1", "--quiet"]
    )
    assert code == 0
    records = read_jsonl(output)
    images = sorted(str(path) for path in photos.glob("*.png"))
    assert [record["image"] for record in records] == images  # nested/ left out without --recursive
    expected = reference_captions(captioner_dir, images)
    assert {record["image"]: record["caption"] for record in records} == expected
    for image in images:
        assert Path(image).with_suffix(".txt").read_text() == expected[image] + "\n"
    assert f"captioned {NUM_IMAGES} image(s)" in capsys.readouterr().out


def test_prompt_recursion_lists_and_several_captions(captioner_dir, photos, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("photos/img00.png\n# a comment\nphotos/img01.png\n")
    output = tmp_path / "out.jsonl"
    args = ["caption", str(listing), str(photos / "nested"), "--model", str(captioner_dir), "--output", str(output)]
    assert main(args + ["--prompt", "a picture of ", "--num-captions", "2", "--num-workers", "0", "--quiet"]) == 0
    records = read_jsonl(output)
    assert [Path(record["image"]).name for record in records] == ["img00.png", "img01.png", "deep.png"]
    assert all(len(record["captions"]) == 2 and record["caption"] == record["captions"][0] for record in records)
    expected = reference_captions(captioner_dir, [photos / "img00.png"], prompt="a picture of ")
    assert records[0]["caption"] == expected[str(photos / "img00.png")]


def test_bad_inputs_are_named_counted_and_set_the_exit_status(captioner_dir, photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes((photos / "img00.png").read_bytes()[:60])  # truncated
    (tmp_path / "empty").mkdir()
    output = tmp_path / "out.jsonl"
    code = main(
        ["caption", str(photos), str(tmp_path / "missing.jpg"), str(tmp_path / "empty"), "--model", str(captioner_dir)]
        + ["--output", str(output), "--num-workers", "0", "--quiet"]
    )
    assert code == 1
    err = capsys.readouterr()
    assert f"{tmp_path / 'missing.jpg'}: no such file or folder" in err.err
    assert f"{tmp_path / 'empty'}: no image files in this folder" in err.err
    assert "broken.png" in err.err
    assert f"captioned {NUM_IMAGES} image(s), 3 failed" in err.out
    assert len(read_jsonl(output)) == NUM_IMAGES


def test_refuses_what_cannot_run(captioner_dir, photos, tmp_path, capsys):
    retrieval = tmp_path / "retrieval"
    BlipForImageTextRetrieval(make_config()).save_pretrained(retrieval)
    build_processor(make_tokenizer(), image_size=32).save_pretrained(retrieval)
    assert main(["caption", str(photos), "--model", str(retrieval), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "is not a captioner" in capsys.readouterr().err
    assert main(["caption", str(photos), "--model", str(captioner_dir)]) == 2
    assert "nowhere to write" in capsys.readouterr().err
    assert main(["caption", str(photos), "--model", str(captioner_dir), "--sidecar", "txt"]) == 2
    assert "starts with a dot" in capsys.readouterr().err
    assert main(["caption", str(photos), "--model", str(tmp_path / "nope"), "--sidecar", ".txt"]) == 2
    assert "cannot load a captioner" in capsys.readouterr().err


def test_skip_existing_sidecars(captioner_dir, photos, tmp_path, capsys):
    (photos / "img03.txt").write_text("kept\n")
    assert main(["caption", str(photos), "--model", str(captioner_dir), "--sidecar", ".txt", "--skip-existing"]) == 0
    assert (photos / "img03.txt").read_text() == "kept\n"
    assert (photos / "img04.txt").exists()
    assert f"captioned {NUM_IMAGES - 1} image(s), 1 already done" in capsys.readouterr().out


def test_sigkill_then_the_same_command_captions_every_image_exactly_once(captioner_dir, photos, tmp_path):
    output = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "transformers_blip.cli", "caption", str(photos), "--model", str(captioner_dir)]
    command += ["--output", str(output), "--batch-size", "1", "--num-workers", "0", "--quiet"]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not output.exists() or output.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    lines_before = output.read_text().count("\n")
    assert 3 <= lines_before < NUM_IMAGES, "the kill should land mid-run"
    with open(output, "a") as file:
        file.write('{"image": "half a li')  # what a kill in the middle of a write leaves
    assert subprocess.run(command, capture_output=True).returncode == 0
    records = read_jsonl(output)
    images = sorted(str(path) for path in photos.glob("*.png"))
    assert sorted(record["image"] for record in records) == images
    assert {record["image"]: record["caption"] for record in records} == reference_captions(captioner_dir, images)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces `width` x `height` pixels and holds none: a decompression bomb's signature."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_parquet_files_and_webdataset_shards_are_captioned_and_resumed(captioner_dir, photos, tmp_path, capsys):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    images = sorted(photos.glob("*.png"))
    table = pa.table({"picture": [{"bytes": path.read_bytes(), "path": path.name} for path in images[:4]]})
    pq.write_table(table, tmp_path / "rows.parquet")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for number, path in enumerate(images[4:7]):
            data = path.read_bytes()
            member = tarfile.TarInfo(f"sample{number}.png")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        member = tarfile.TarInfo("lonely.json")  # a sample without an image
        member.size = 2
        tar.addfile(member, io.BytesIO(b"{}"))
    (tmp_path / "damaged.tar").write_bytes(b"not a tar at all" * 40)
    output = tmp_path / "captions.jsonl"
    args = ["caption", str(tmp_path / "rows.parquet"), str(tmp_path / "shard.tar"), str(tmp_path / "damaged.tar")]
    args += ["--model", str(captioner_dir), "--output", str(output), "--image-column", "picture", "--quiet"]
    assert main(args + ["--num-workers", "2"]) == 1  # the damaged shard and the sample without an image
    records = read_jsonl(output)
    names = [f"{tmp_path / 'rows.parquet'}:{row}" for row in range(4)]
    names += [f"{tmp_path / 'shard.tar'}/sample{number}" for number in range(3)]
    assert sorted(record["image"] for record in records) == sorted(names)
    expected = reference_captions(captioner_dir, images[:7])
    by_name = {record["image"]: record["caption"] for record in records}
    assert [by_name[name] for name in names] == [expected[str(path)] for path in images[:7]]

    output.write_text("".join(line + "\n" for line in output.read_text().splitlines()[:3]))  # a run cut short
    assert main(args[:3] + args[4:] + ["--num-workers", "0"]) == 1  # the sample without an image, still
    assert sorted(record["image"] for record in read_jsonl(output)) == sorted(names)
    assert "captioned 4 image(s), 3 already done, 1 failed" in capsys.readouterr().out
    wrong_column = ["caption", str(tmp_path / "rows.parquet"), "--model", str(captioner_dir), "--quiet"]
    assert main(wrong_column + ["--output", str(tmp_path / "other.jsonl"), "--num-workers", "0"]) == 1
    assert "no column 'image'; its columns: ['picture']" in capsys.readouterr().err


def test_score_with_a_retrieval_model_records_the_itm_match_probability(captioner_dir, photos, tmp_path):
    from PIL import Image

    from transformers_blip import BlipImageTextProcessor

    torch.manual_seed(3)
    retrieval_dir = tmp_path / "retrieval"
    BlipForImageTextRetrieval(make_config()).save_pretrained(retrieval_dir)
    build_processor(make_tokenizer(), image_size=32).save_pretrained(retrieval_dir)
    output = tmp_path / "scored.jsonl"
    args = ["caption", str(photos / "img00.png"), str(photos / "img01.png"), "--model", str(captioner_dir)]
    args += ["--output", str(output), "--score-with", str(retrieval_dir), "--num-captions", "2", "--quiet"]
    assert main(args + ["--num-workers", "0"]) == 0
    scorer = BlipForImageTextRetrieval.from_pretrained(retrieval_dir).eval()
    processor = BlipImageTextProcessor.from_pretrained(retrieval_dir)
    for record in read_jsonl(output):
        assert len(record["itm_scores"]) == 2
        for caption, score in zip(record["captions"], record["itm_scores"]):
            inputs = processor(images=Image.open(record["image"]).convert("RGB"), text=caption, return_tensors="pt")
            with torch.no_grad():
                expected = scorer(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).itm_score
            assert score == pytest.approx(float(expected), abs=1e-4)
    assert (
        main(args[:5] + ["--sidecar", ".txt", "--score-with", str(retrieval_dir)]) == 2
    )  # no JSON lines to score into


def test_huge_images_precision_and_devices(captioner_dir, photos, tmp_path, capsys):
    (photos / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    output = tmp_path / "out.jsonl"
    args = ["caption", str(photos / "bomb.png"), str(photos / "img00.png"), "--model", str(captioner_dir)]
    args += ["--output", str(output), "--num-workers", "0", "--quiet"]
    assert main(args + ["--dtype", "bf16"]) == 1
    err = capsys.readouterr()
    assert "bomb.png" in err.err and "1 failed" in err.out
    assert [Path(record["image"]).name for record in read_jsonl(output)] == ["img00.png"]
    assert main(args[:3] + [str(photos / "img01.png")] + args[3:] + ["--max-pixels", "100"]) == 1  # 40 x 48 is over it
    assert "captioned 0 image(s), 1 already done, 2 failed" in capsys.readouterr().out
    assert main(args + ["--device", "no-such-device"]) == 2
    assert "--device no-such-device" in capsys.readouterr().err


def test_every_option_of_every_subcommand_is_documented():
    import argparse

    from transformers_blip.cli import SUBCOMMANDS, build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)
    for name, subparser in subparsers.choices.items():
        undocumented = [action.dest for action in subparser._actions if not action.help]
        assert undocumented == [], f"blip {name}: options without help: {undocumented}"
        assert subparser.format_help()
