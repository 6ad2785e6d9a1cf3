"""`blip retrieve` (index a folder incrementally, search it by text and image, re-rank by ITM) and `blip vqa`
(generate or rank answers): results equal to the library's, bad inputs named and counted."""

import json

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipImageTextProcessor,
    build_processor,
)
from transformers_blip.cli import main
from transformers_blip.pipelines import BlipVisualQuestionAnsweringPipeline
from transformers_blip.retrieval_index import ImageIndex


def saved(head_class, directory, seed=0):
    torch.manual_seed(seed)
    head_class(make_config()).save_pretrained(directory)
    build_processor(make_tokenizer(), image_size=32).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "retrieval": saved(BlipForImageTextRetrieval, root / "retrieval"),
        "vqa": saved(BlipForQuestionAnswering, root / "vqa"),
        "captioner": saved(BlipForConditionalGeneration, root / "captioner"),
    }


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(4):
        random_image(index).save(folder / f"img{index}.png")
    return folder


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_retrieve_indexes_incrementally_and_ranks_as_the_library(models, photos, tmp_path, capsys):
    index_path, output = tmp_path / "photos.safetensors", tmp_path / "hits.jsonl"
    base = ["retrieve", "--model", str(models["retrieval"]), "--index", str(index_path), "--quiet"]
    assert main([*base[:1], str(photos), *base[1:], "--num-workers", "0"]) == 0
    assert "indexed 4 image(s), 4 embedded now" in capsys.readouterr().out
    random_image(7).save(photos / "new.png")
    queries = ["--text", "a red circle", "--text", "two squares", "--image", str(photos / "img1.png"), "-k", "3"]
    assert main([*base[:1], str(photos), *base[1:], "--num-workers", "0", *queries, "--output", str(output)]) == 0
    assert "indexed 5 image(s), 1 embedded now" in capsys.readouterr().out

    model = BlipForImageTextRetrieval.from_pretrained(models["retrieval"]).eval()
    processor = BlipImageTextProcessor.from_pretrained(models["retrieval"])
    index = ImageIndex.load(index_path)
    records = read_jsonl(output)
    assert [(record["kind"], record["query"]) for record in records] == [
        ("text", "a red circle"),
        ("text", "two squares"),
        ("image", str(photos / "img1.png")),
    ]
    expected = index.search(model, processor, "two squares", k=3)
    assert [(hit["image"], pytest.approx(hit["score"], abs=1e-5)) for hit in records[1]["results"]] == expected
    assert records[2]["results"][0]["image"] == str(photos / "img1.png")

    assert main([*base, "--text", "a red circle", "-k", "2", "--rerank"]) == 0  # the index as it is, printed
    printed = capsys.readouterr().out.splitlines()
    reranked = index.search(model, processor, "a red circle", k=2, rerank=True)
    assert printed[0] == "text query: a red circle"
    assert [line.split()[-1] for line in printed[1:]] == [path for path, _ in reranked]


def test_retrieve_faults(models, photos, tmp_path, capsys):
    index_path = tmp_path / "photos.safetensors"
    base = ["--model", str(models["retrieval"]), "--index", str(index_path), "--quiet", "--num-workers", "0"]
    (photos / "broken.png").write_bytes(b"\x89PNG broken")
    assert main(["retrieve", str(photos), str(tmp_path / "gone"), *base, "--image", str(tmp_path / "nope.png")]) == 1
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and f"{tmp_path / 'gone'}: no such file or folder" in captured.err
    assert "nope.png" in captured.err and "indexed 4 image(s), 4 embedded now, 2 failed" in captured.out

    assert main(["retrieve", *base]) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert main(["retrieve", *base[:2], "--index", str(tmp_path / "absent.safetensors"), "--text", "x"]) == 2
    assert "no such index" in capsys.readouterr().err
    assert main(["retrieve", "--model", str(models["captioner"]), *base[2:], "--text", "x"]) == 2
    assert "is not a retrieval model" in capsys.readouterr().err
    other = saved(BlipForImageTextRetrieval, tmp_path / "other", seed=5)
    assert main(["retrieve", "--model", str(other), *base[2:], "--text", "x"]) == 2
    assert "built by another model" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    assert main(["retrieve", *base[:2], "--index", str(tmp_path / "junk.safetensors"), "--text", "x"]) == 2
    assert "not an image index" in capsys.readouterr().err


def test_vqa_generates_and_ranks_as_the_pipeline(models, photos, tmp_path, capsys):
    model = BlipForQuestionAnswering.from_pretrained(models["vqa"]).eval()
    processor = BlipImageTextProcessor.from_pretrained(models["vqa"])
    pipe = BlipVisualQuestionAnsweringPipeline(model=model, processor=processor)
    image = str(photos / "img0.png")
    question = ["--model", str(models["vqa"]), "--question", "what colour is the circle?"]
    output = tmp_path / "answers.jsonl"
    assert main(["vqa", image, str(photos / "img1.png"), *question, "--output", str(output)]) == 0
    records = read_jsonl(output)
    assert len(records) == 2 and "answered 2 image(s)" in capsys.readouterr().out
    expected = pipe(image=image, question="what colour is the circle?", num_beams=3, max_length=10)
    assert records[0]["answers"] == [{"answer": expected[0]["answer"], "score": pytest.approx(expected[0]["score"])}]

    answers = tmp_path / "answers.txt"
    answers.write_text("red\nblue\n\ngreen\nred\n")
    assert main(["vqa", image, *question, "--answers", str(answers), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    ranked = pipe(image=image, question="what colour is the circle?", candidates=["red", "blue", "green"], top_k=3)
    assert printed[0] == f"{image}: " + "; ".join(f"{a['answer']} ({a['score']:.4g})" for a in ranked)
    assert sorted(answer["answer"] for answer in ranked) == ["blue", "green", "red"]


def test_vqa_faults(models, photos, tmp_path, capsys):
    question = ["--model", str(models["vqa"]), "--question", "what is it?"]
    (photos / "broken.png").write_bytes(b"\x89PNG broken")
    assert (
        main(["vqa", str(photos / "broken.png"), str(photos / "img0.png"), str(tmp_path / "nope.png"), *question]) == 1
    )
    captured = capsys.readouterr()
    assert (
        "broken.png" in captured.err and "nope.png" in captured.err and "answered 1 image(s), 2 failed" in captured.out
    )
    assert main(["vqa", str(photos / "img0.png"), "--model", str(models["captioner"]), "--question", "what?"]) == 2
    assert "is not a VQA model" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["vqa", str(photos / "img0.png"), *question, "--answers", str(tmp_path / "empty.txt")]) == 2
    assert "no answers in it" in capsys.readouterr().err
    assert main(["vqa", str(photos / "img0.png"), *question, "--answers", str(tmp_path / "absent.txt")]) == 2
    assert "cannot read it" in capsys.readouterr().err
    assert main(["vqa", str(photos / "img0.png"), "--model", str(tmp_path / "nowhere"), "--question", "what?"]) == 2
    assert "cannot load a VQA model" in capsys.readouterr().err
