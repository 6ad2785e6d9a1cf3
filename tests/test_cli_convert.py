"""`blip convert`: ours -> original .pth -> ours, ours <-> transformers' layout, each exact; bad sources and outputs
named in one line."""

import json

import pytest
import torch
from conftest import make_config, make_tokenizer
from test_convert_original import VOCAB_FILE

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForVisualReasoning,
    BlipImageTextProcessor,
    build_processor,
)
from transformers_blip.cli import main
from transformers_blip.convert.original import original_state_dict


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ours")
    model = BlipForConditionalGeneration(make_config()).eval()
    model.save_pretrained(directory)
    build_processor(make_tokenizer(), image_size=32).save_pretrained(directory)
    return model, directory


def same_outputs(model, directory, pixel_values, text_ids):
    loaded = BlipForConditionalGeneration.from_pretrained(directory).eval()
    with torch.no_grad():
        return torch.equal(loaded(pixel_values, text_ids).logits, model(pixel_values, text_ids).logits)


def test_original_round_trip(captioner, tmp_path, pixel_values, text_ids, capsys):
    model, ours = captioner
    checkpoint = tmp_path / "caption.pth"
    assert main(["convert", str(ours), str(checkpoint), "--to", "original"]) == 0
    assert "model" in torch.load(checkpoint, weights_only=True)
    back = tmp_path / "back"
    args = ["convert", str(checkpoint), str(back), "--config", str(ours), "--vocab_file", str(VOCAB_FILE)]
    assert main(args) == 0
    assert same_outputs(model, back, pixel_values, text_ids)
    assert json.loads((back / "conversion_report.json").read_text())["dropped_unexpected"] == {}
    assert len(BlipImageTextProcessor.from_pretrained(back).tokenizer) == 128
    assert "BlipForConditionalGeneration -> " in capsys.readouterr().out


def test_transformers_layout_round_trip(captioner, tmp_path, pixel_values, text_ids):
    model, ours = captioner
    theirs = tmp_path / "theirs"
    assert main(["convert", str(ours), str(theirs), "--to", "transformers"]) == 0
    assert json.loads((theirs / "config.json").read_text())["model_type"] == "blip"
    assert (theirs / "processor_config.json").exists() or (theirs / "preprocessor_config.json").exists()
    back = tmp_path / "back"
    assert main(["convert", str(theirs), str(back)]) == 0
    assert json.loads((back / "config.json").read_text())["model_type"] != "blip"
    assert same_outputs(model, back, pixel_values, text_ids)


def test_bad_sources_and_outputs_are_named(captioner, tmp_path, capsys):
    _, ours = captioner
    assert main(["convert", str(tmp_path / "absent.pth"), str(tmp_path / "out")]) == 2
    assert "absent.pth: no such file or folder" in capsys.readouterr().err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert main(["convert", str(tmp_path / "junk.pth"), str(tmp_path / "out")]) == 2
    assert "junk.pth" in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["convert", str(ours), str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert main(["convert", str(ours), str(tmp_path / "taken"), "--overwrite"]) == 0
    assert not (tmp_path / "taken" / "keep.txt").exists()
    assert main(["convert", str(tmp_path / "junk.pth"), str(tmp_path / "x.pth"), "--to", "original"]) == 2
    assert "original checkpoint already" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "not a BLIP model directory" in capsys.readouterr().err
    nlvr = tmp_path / "nlvr"
    BlipForVisualReasoning(make_config()).save_pretrained(nlvr)
    assert main(["convert", str(nlvr), str(tmp_path / "nlvr-theirs"), "--to", "transformers"]) == 2
    assert "no counterpart" in capsys.readouterr().err and not (tmp_path / "nlvr-theirs").exists()
    assert not [path.name for path in tmp_path.iterdir() if "partial" in path.name]


def test_an_incomplete_or_mismatched_pth_writes_nothing_unless_asked(captioner, tmp_path, capsys):
    model, ours = captioner
    state_dict = original_state_dict(model)
    del state_dict["visual_encoder.norm.weight"]  # now missing
    torch.save({"model": state_dict}, tmp_path / "partial.pth")
    args = ["convert", str(tmp_path / "partial.pth"), str(tmp_path / "out"), "--config", str(ours)]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "MISSING vision_model.post_layernorm.weight" in captured.out  # the summary the refusal points to
    assert "1 missing (listed above); nothing written (--allow-partial" in captured.err
    longer_vocab = tmp_path / "longer_vocab.txt"
    longer_vocab.write_text(VOCAB_FILE.read_text().rstrip("\n") + "\nzebra\n")
    assert main(args + ["--allow-partial", "--vocab_file", str(longer_vocab)]) == 2
    assert "longer_vocab.txt gives 129 tokens" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(args + ["--allow-partial", "--vocab_file", str(VOCAB_FILE)]) == 0
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["missing"] == ["vision_model.post_layernorm.weight"]
    assert len(BlipImageTextProcessor.from_pretrained(tmp_path / "out").tokenizer) == 128
