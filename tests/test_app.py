"""The web app's work without the browser: captions with every decoding option, answers generated or ranked, text
search over an index, loading from saved directories, and the bad inputs each refuses by name."""

import io

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    build_processor,
    decode_captions,
)
from transformers_blip.app import BlipApp, ModelAndProcessor, build_interface
from transformers_blip.batch_captioning import CaptionSettings
from transformers_blip.cli.common import CommandError
from transformers_blip.retrieval_index import ImageIndex


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    processor = build_processor(make_tokenizer(), image_size=32)
    vqa = BlipForQuestionAnswering(make_config()).eval()
    vqa.generation_config.min_length = 4  # a random decoder would end at once, with an empty answer
    return {
        "captioner": ModelAndProcessor(BlipForConditionalGeneration(make_config()).eval(), processor),
        "vqa": ModelAndProcessor(vqa, processor),
        "retrieval": ModelAndProcessor(BlipForImageTextRetrieval(make_config()).eval(), processor),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for index in range(5):
        random_image(index).save(folder / f"photo{index}.png")
    return folder


@pytest.fixture(scope="module")
def app(models, photos):
    index = ImageIndex.build(*models["retrieval"], photos, photos.parent / "photos.index.safetensors")
    return BlipApp(captioner=models["captioner"], vqa=models["vqa"], retrieval=models["retrieval"], index=index)


def pixels(processor, image):
    return processor(images=image, return_tensors="pt")["pixel_values"]


def test_a_caption_is_the_models_beam_search_with_the_prompt_stripped(app, models):
    model, processor = models["captioner"]
    image = random_image(1)
    expected = decode_captions(processor, model.generate(pixel_values=pixels(processor, image)))
    assert app.caption(image) == expected

    prompt = "a picture of"
    prompt_ids = processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = model.generate(pixel_values=pixels(processor, image), input_ids=prompt_ids, max_length=12)
    assert processor.tokenizer.decode(generated[0], skip_special_tokens=True).startswith(prompt)
    with_prompt = app.caption(image, CaptionSettings(prompt=prompt, max_length=12))
    assert with_prompt == decode_captions(processor, generated, prompt=prompt)
    assert not with_prompt[0].startswith(prompt)


def test_decoding_options_reach_generate(app, models):
    model, processor = models["captioner"]
    image = random_image(2)
    three = app.caption(image, CaptionSettings(num_beams=4, num_captions=3, min_length=3, max_length=9))
    generated = model.generate(
        pixel_values=pixels(processor, image), num_beams=4, num_return_sequences=3, min_length=3, max_length=9
    )
    assert three == decode_captions(processor, generated) and len(three) == 3
    for caption in three:  # each token decodes to at most one word; [DEC] counts towards the length
        assert len(caption.split()) <= 9 - 1

    sampled = CaptionSettings(do_sample=True, top_p=0.9, num_captions=2, seed=3)
    assert app.caption(image, sampled) == app.caption(image, sampled)  # seeded
    others = [app.caption(image, CaptionSettings(do_sample=True, seed=seed))[0] for seed in range(4, 8)]
    assert len(set(others)) > 1


def test_images_may_be_paths_bytes_or_pil_images_of_any_mode(app, photos):
    path = photos / "photo0.png"
    from_pil = app.caption(random_image(0))
    assert app.caption(str(path)) == from_pil
    assert app.caption(path.read_bytes()) == from_pil
    grey = io.BytesIO()
    random_image(0).convert("L").save(grey, format="PNG")
    assert len(app.caption(grey.getvalue())) == 1


def test_answers_are_generated_or_the_best_ranked_candidate(app, models):
    model, processor = models["vqa"]
    image = random_image(3)
    question = "what colour is the square ?"
    inputs = processor(images=image, text=question, return_tensors="pt")
    generated = decode_captions(processor, model.generate(**inputs))
    assert app.answer(image, question) == generated[0] != ""

    candidates = ["red", "blue", "green", "yellow"]
    tokens = processor.tokenizer(candidates, padding="longest", return_tensors="pt")
    ranking = model.rank(
        **inputs, candidate_input_ids=tokens["input_ids"], candidate_attention_mask=tokens["attention_mask"], k=4
    )
    assert app.answer(image, question, candidates + ["  ", ""]) == candidates[int(ranking.answer_index[0])]


def test_search_ranks_the_index_by_the_text(app, photos):
    hits = app.search("a red square", k=3)
    assert len(hits) == 3
    assert {path for path, _ in hits} <= {str(path) for path in photos.glob("*.png")}
    scores = [score for _, score in hits]
    assert scores == sorted(scores, reverse=True) and all(-1 <= score <= 1 for score in scores)
    reranked = app.search("a red square", k=4, rerank=True)
    assert len(reranked) == 4 and all(0 <= score <= 1 for _, score in reranked)
    assert app.image_folders() == [str(photos.resolve())]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda app: app.caption(None), "no image"),
        (lambda app: app.caption(b"not an image"), "<bytes>"),
        (lambda app: app.caption("/no/such/photo.jpg"), "/no/such/photo.jpg"),
        (lambda app: app.caption(random_image(0), CaptionSettings(num_captions=0)), "at least one caption"),
        (lambda app: app.caption(random_image(0), CaptionSettings(min_length=9, max_length=5)), "minimum length 9"),
        (lambda app: app.caption(random_image(0), CaptionSettings(do_sample=True, top_p=0)), "top-p"),
        (lambda app: app.answer(random_image(0), "   "), "ask a question"),
        (lambda app: app.search(""), "describe the image"),
    ],
)
def test_bad_inputs_are_refused_with_a_message_naming_them(app, call, message):
    with pytest.raises(ValueError, match=message):
        call(app)


def test_an_app_offers_only_the_services_it_has_models_for(models, photos, tmp_path):
    captions_only = BlipApp(captioner=models["captioner"])
    assert captions_only.services == ["caption"]
    with pytest.raises(ValueError, match="--vqa-model"):
        captions_only.answer(random_image(0), "what colour ?")
    with pytest.raises(ValueError, match="--index"):
        captions_only.search("a red square")
    with pytest.raises(ValueError, match="at least one model"):
        BlipApp()
    with pytest.raises(ValueError, match="both a retrieval model and the index"):
        BlipApp(retrieval=models["retrieval"])
    torch.manual_seed(1)
    other = ModelAndProcessor(BlipForImageTextRetrieval(make_config()).eval(), models["retrieval"].processor)
    foreign_index = ImageIndex.build(*other, photos, tmp_path / "other.index.safetensors")
    with pytest.raises(ValueError, match="another model"):
        BlipApp(retrieval=models["retrieval"], index=foreign_index)


def test_load_reads_saved_models_and_refuses_one_that_does_not_do_the_job(models, photos, tmp_path):
    for name, (model, processor) in models.items():
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    index_path = tmp_path / "photos.index.safetensors"
    ImageIndex.build(*models["retrieval"], photos, index_path)
    loaded = BlipApp.load(
        model=str(tmp_path / "captioner"),
        vqa_model=str(tmp_path / "vqa"),
        retrieval_model=str(tmp_path / "retrieval"),
        index=index_path,
    )
    assert loaded.services == ["caption", "vqa", "search"]
    image = random_image(4)
    assert loaded.caption(image) == BlipApp(captioner=models["captioner"]).caption(image)
    with pytest.raises(CommandError, match="is not a VQA model"):
        BlipApp.load(vqa_model=str(tmp_path / "captioner"))
    with pytest.raises(ValueError, match="missing.index"):
        BlipApp.load(retrieval_model=str(tmp_path / "retrieval"), index=tmp_path / "missing.index")


def test_the_page_has_a_tab_for_each_service(app, models):
    labels = {block.label for block in build_interface(app).blocks.values() if type(block).__name__ == "Tab"}
    assert labels == {"Caption", "Ask", "Search"}
    only_vqa = build_interface(BlipApp(vqa=models["vqa"]))
    assert {block.label for block in only_vqa.blocks.values() if type(block).__name__ == "Tab"} == {"Ask"}


def test_blip_serve_refuses_what_it_cannot_serve_in_one_line(models, photos, tmp_path, capsys):
    from transformers_blip.cli import main

    for name in ("captioner", "retrieval"):
        models[name].model.save_pretrained(tmp_path / name)
        models[name].processor.save_pretrained(tmp_path / name)
    torch.manual_seed(2)
    other = BlipForImageTextRetrieval(make_config()).eval()
    ImageIndex.build(other, models["retrieval"].processor, photos, tmp_path / "other.index.safetensors")
    refused = {
        (): "nothing to serve",
        ("--retrieval-model", str(tmp_path / "retrieval")): "needs both --retrieval-model and --index",
        ("--model", str(tmp_path / "captioner"), "--port", "70000"): "--port 70000",
        ("--vqa-model", str(tmp_path / "captioner")): "is not a VQA model",
        ("--model", str(tmp_path / "nowhere")): "nowhere",
        (
            "--retrieval-model",
            str(tmp_path / "retrieval"),
            "--index",
            str(tmp_path / "other.index.safetensors"),
        ): "another model",
    }
    capsys.readouterr()
    for arguments, message in refused.items():
        assert main(["serve", *arguments]) == 2
        error = capsys.readouterr().err
        said = [line for line in error.splitlines() if line.startswith("blip serve: ")]
        assert len(said) == 1 and message in said[0] and "Traceback" not in error


def test_the_space_builds_its_app_from_environment_variables(models, tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    for name in ("captioner", "vqa"):
        models[name].model.save_pretrained(tmp_path / name)
        models[name].processor.save_pretrained(tmp_path / name)
    monkeypatch.setenv("BLIP_CAPTION_MODEL", str(tmp_path / "captioner"))
    monkeypatch.setenv("BLIP_VQA_MODEL", "")  # an empty value leaves the tab out
    space = runpy.run_path(str(Path(__file__).parents[1] / "spaces" / "app.py"), run_name="space")
    assert space["app"].services == ["caption"]
    assert {block.label for block in space["demo"].blocks.values() if type(block).__name__ == "Tab"} == {"Caption"}
    image = random_image(5)
    assert space["app"].caption(image) == BlipApp(captioner=models["captioner"]).caption(image)

    monkeypatch.setenv("BLIP_VQA_MODEL", str(tmp_path / "vqa"))
    monkeypatch.setenv("BLIP_RETRIEVAL_MODEL", str(tmp_path / "vqa"))  # without BLIP_INDEX
    with pytest.raises(ValueError, match="both a retrieval model and the index"):
        BlipApp.from_environment()
    monkeypatch.delenv("BLIP_RETRIEVAL_MODEL")
    assert BlipApp.from_environment().services == ["caption", "vqa"]
