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
