"""Saving, Auto classes, remote code and the pipelines, each in a fresh Python process where it matters."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import random_image, tiny_vocab
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForVisualQuestionAnswering,
    BertTokenizerFast,
    BlipImageProcessorPil,
    BlipProcessor,
    pipeline,
)

from transformers_blip import BlipForConditionalGeneration, BlipForQuestionAnswering, BlipModel, build_processor
from transformers_blip.data import load_image
from transformers_blip.image_processing_blip import ImageDecodeError
from transformers_blip.pipelines import BlipImageToTextPipeline, BlipVisualQuestionAnsweringPipeline

# Makes `import transformers_blip` fail, as on a machine where the package is not installed.
WITHOUT_PACKAGE = "import sys; sys.modules['transformers_blip'] = None\n"


def run_without_package(code: str) -> dict:
    """Runs `code` in a new interpreter that cannot import transformers_blip; its last stdout line is JSON."""
    program = WITHOUT_PACKAGE + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def saved_captioner(tmp_path, config, processor):
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    return model, tmp_path / "captioner"


@pytest.fixture
def saved_vqa(tmp_path, config, processor):
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(config).eval()
    model.save_pretrained(tmp_path / "vqa")
    processor.save_pretrained(tmp_path / "vqa")
    return model, tmp_path / "vqa"


def test_saved_directory_contents(saved_captioner):
    _, path = saved_captioner
    files = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "pipelines.py", "README.md"} <= files
    assert {"modeling_blip.py", "modeling_med.py", "modeling_vision.py", "configuration_blip.py"} <= files
    config = json.loads((path / "config.json").read_text())
    assert config["custom_pipelines"]["image-to-text"]["impl"] == "pipelines.BlipImageToTextPipeline"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_blip.BlipForConditionalGeneration"
    assert "pipeline_tag: image-to-text" in (path / "README.md").read_text()


def test_auto_classes_load_our_heads_with_the_package(saved_captioner, saved_vqa, tmp_path, config):
    model, path = saved_captioner
    assert type(AutoConfig.from_pretrained(path)).__name__ == "BlipConfig"
    loaded = AutoModelForImageTextToText.from_pretrained(path)
    assert isinstance(loaded, BlipForConditionalGeneration)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert isinstance(AutoModelForVisualQuestionAnswering.from_pretrained(saved_vqa[1]), BlipForQuestionAnswering)
    BlipModel(config).save_pretrained(tmp_path / "features")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "features"), BlipModel)


def test_remote_code_captions_without_the_package(saved_captioner, processor, tmp_path):
    """A fresh process without transformers_blip: Auto class + pipeline("image-to-text") from the saved files only."""
    model, path = saved_captioner
    image = random_image(0)
    image.save(tmp_path / "image.png")
    files = sixteen_bit_and_transparent_files(tmp_path)
    out = run_without_package(
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        path = {str(path)!r}
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        inputs = processor(images=Image.open({str(tmp_path / "image.png")!r}), return_tensors="pt")
        ids = model.generate(inputs.pixel_values, num_beams=1, max_length=10).tolist()
        captioner = pipeline("image-to-text", model=path, trust_remote_code=True)
        result = captioner(Image.open({str(tmp_path / "image.png")!r}))
        # What the pipeline feeds the model for files given by path, decoded by the saved processor's code.
        pixels = [captioner.preprocess(file)["pixel_values"].tolist() for file in {[str(file) for file in files]!r}]
        print(json.dumps({{"class": type(model).__module__, "ids": ids, "result": result, "pixels": pixels}}))
        """
    )
    assert out["class"].startswith("transformers_modules")
    assert isinstance(out["result"], list) and len(out["result"]) == 1
    assert set(out["result"][0]) == {"generated_text"} and isinstance(out["result"][0]["generated_text"], str)
    # The child's generation equals ours on the same processed image.
    local = pipeline("image-to-text", model=str(path), pipeline_class=BlipImageToTextPipeline)
    pixels = local.processor(images=image, return_tensors="pt").pixel_values
    assert model.generate(pixels, num_beams=1, max_length=10).tolist() == out["ids"]
    assert local(image) == out["result"]
    for file, remote_pixels in zip(files, out["pixels"]):
        training = processor(images=load_image(file), return_tensors="pt").pixel_values
        assert torch.equal(torch.tensor(remote_pixels), training)


def test_remote_code_answers_questions_without_the_package(saved_vqa):
    _, path = saved_vqa
    out = run_without_package(
        f"""
        import json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        image = Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8))
        vqa = pipeline("visual-question-answering", model={str(path)!r}, trust_remote_code=True)
        generated = vqa(image=image, question="what colour is the square ?", top_k=2)
        ranked = vqa(image=image, question="what colour is the square ?", candidates=["red", "blue", "green"], top_k=3)
        print(json.dumps({{"generated": generated, "ranked": ranked}}))
        """
    )
    assert len(out["generated"]) == 2 and all(set(a) == {"answer", "score"} for a in out["generated"])
    assert out["generated"][0]["score"] >= out["generated"][1]["score"]
    assert sorted(a["answer"] for a in out["ranked"]) == ["blue", "green", "red"]
    scores = [a["score"] for a in out["ranked"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1


def test_image_text_to_text_with_a_prompt(saved_captioner):
    """transformers' own `image-text-to-text` pipeline works with our captioner and a text prompt."""
    model, path = saved_captioner
    pipe = pipeline("image-text-to-text", model=str(path))
    result = pipe(images=random_image(1), text="a picture of", generate_kwargs={"num_beams": 1, "max_length": 12})
    assert result[0]["input_text"] == "a picture of"
    assert result[0]["generated_text"].startswith("a picture of")
    ours = pipeline("image-to-text", model=str(path), pipeline_class=BlipImageToTextPipeline)
    stripped = ours(random_image(1), prompt="a picture of", num_beams=1, max_length=12)[0]["generated_text"]
    # Same caption, up to how the decoder spaces punctuation.
    assert result[0]["generated_text"].replace(" ", "") == f"a picture of {stripped}".replace(" ", "")


def test_pipeline_class_without_remote_code(saved_captioner, saved_vqa):
    captioner = pipeline("image-to-text", model=str(saved_captioner[1]), pipeline_class=BlipImageToTextPipeline)
    batch = captioner([random_image(2), random_image(3)], num_beams=1, max_length=8)
    assert len(batch) == 2 and all(len(item) == 1 and "generated_text" in item[0] for item in batch)
    vqa = pipeline(
        "visual-question-answering", model=str(saved_vqa[1]), pipeline_class=BlipVisualQuestionAnsweringPipeline
    )
    with pytest.raises(ValueError, match="image=... and question="):
        vqa(image=random_image(4))


def test_push_to_hub_uploads_everything_with_a_model_card(saved_captioner, monkeypatch):
    """Everything up to the network: the repo is created and the folder uploaded holds weights, code and card."""
    model, _ = saved_captioner
    calls = {}

    class Repo:
        repo_id = "someone/blip-captioner"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return Repo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        from pathlib import Path

        folder = Path(folder_path)
        calls["files"] = {p.name for p in folder.iterdir()}
        calls["card"] = (folder / "README.md").read_text()
        calls["config"] = json.loads((folder / "config.json").read_text())
        return "uploaded"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def load_card(repo_id, **kwargs):  # a new repo: no card yet
        raise EntryNotFoundError(repo_id)

    monkeypatch.setattr(ModelCard, "load", load_card)
    assert model.push_to_hub("blip-captioner") == "uploaded"
    assert calls["create_repo"] == "blip-captioner"
    assert {"model.safetensors", "config.json", "pipelines.py", "modeling_blip.py", "README.md"} <= calls["files"]
    assert "pipeline_tag: image-to-text" in calls["card"] and "someone/blip-captioner" in calls["card"]
    assert "image-to-text" in calls["config"]["custom_pipelines"]


@torch.no_grad()
def test_zero_shot_image_classification_ranks_labels_by_itc(tmp_path, config, processor):
    torch.manual_seed(0)
    model = BlipModel(config).eval()
    model.temp.fill_(0.01)  # sharper than at initialisation, so that the scores differ clearly
    path = tmp_path / "features"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    image, labels = random_image(0), ["red square", "blue circle", "green triangle"]
    image.save(tmp_path / "image.png")

    # The expected scores: a softmax over the ITC logits of the image with each label in the pipeline's template.
    texts = processor(text=[f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    pixels = processor(images=image, return_tensors="pt").pixel_values
    output = model(input_ids=texts.input_ids, attention_mask=texts.attention_mask, pixel_values=pixels)
    logits = output.logits_per_image  # (1, labels)
    expected = dict(zip(labels, logits.softmax(dim=-1)[0].tolist()))
    assert max(expected.values()) - min(expected.values()) > 1e-3

    scores = pipeline("zero-shot-image-classification", model=str(path))(image, candidate_labels=labels)
    assert {row["label"]: row["score"] for row in scores} == pytest.approx(expected, abs=1e-5)
    out = run_without_package(
        f"""
        import json
        from PIL import Image
        from transformers import pipeline
        classifier = pipeline("zero-shot-image-classification", model={str(path)!r}, trust_remote_code=True)
        scores = classifier(Image.open({str(tmp_path / "image.png")!r}), candidate_labels={labels!r})
        print(json.dumps({{"class": type(classifier.model).__module__, "scores": scores}}))
        """
    )
    assert out["class"].startswith("transformers_modules")
    assert {row["label"]: row["score"] for row in out["scores"]} == pytest.approx(expected, abs=1e-5)


def spy_on_generate(pipe, monkeypatch) -> list[torch.Tensor]:
    """Records the pixel values each `generate` call receives, then generates as usual."""
    seen, generate = [], pipe.model.generate

    def recording_generate(*args, **kwargs):
        seen.append(kwargs["pixel_values"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipe.model, "generate", recording_generate)
    return seen


def sixteen_bit_and_transparent_files(tmp_path) -> list:
    """A 16-bit grey ramp (PIL's plain RGB conversion clips it white) and an RGBA image whose transparent half hides
    black pixels (a plain conversion shows them)."""
    ramp = np.tile(np.linspace(0, 65535, 48), (40, 1)).astype(np.uint16)
    PIL.Image.fromarray(ramp).save(tmp_path / "sixteen_bit.png")
    rgba = np.zeros((40, 48, 4), dtype=np.uint8)
    rgba[:, :24] = (255, 0, 0, 255)  # opaque red left half, fully transparent black right half
    PIL.Image.fromarray(rgba).save(tmp_path / "transparent.png")
    return [tmp_path / "sixteen_bit.png", tmp_path / "transparent.png"]


def test_pipelines_decode_files_as_training_and_the_processor_do(saved_captioner, saved_vqa, processor, tmp_path):
    captioner = pipeline("image-to-text", model=str(saved_captioner[1]), pipeline_class=BlipImageToTextPipeline)
    vqa = pipeline(
        "visual-question-answering", model=str(saved_vqa[1]), pipeline_class=BlipVisualQuestionAnsweringPipeline
    )
    monkeypatch = pytest.MonkeyPatch()
    seen_by_captioner, seen_by_vqa = spy_on_generate(captioner, monkeypatch), spy_on_generate(vqa, monkeypatch)
    paths = sixteen_bit_and_transparent_files(tmp_path)
    for path in paths:
        captioner(str(path), num_beams=1, max_length=6)
        vqa(image=str(path), question="what colour is the square ?", num_beams=1, max_length=6)
    monkeypatch.undo()
    for index, path in enumerate(paths):
        training = processor(images=load_image(path), return_tensors="pt").pixel_values
        assert torch.equal(seen_by_captioner[index], training)
        assert torch.equal(seen_by_vqa[index], training)
    # Not clipped to white, and the transparent half white rather than its hidden black.
    grey = processor(images=load_image(paths[0]), return_tensors="np").pixel_values[0, 0]
    assert grey[:, 0].mean() < grey[:, -1].mean()
    assert np.array_equal(np.asarray(load_image(paths[1]))[0, -1], [255, 255, 255])


def test_pipelines_name_a_truncated_file(saved_captioner, saved_vqa, tmp_path):
    encoded = tmp_path / "whole.png"
    random_image(5, size=(64, 64)).save(encoded)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(encoded.read_bytes()[:-200])
    captioner = pipeline("image-to-text", model=str(saved_captioner[1]), pipeline_class=BlipImageToTextPipeline)
    with pytest.raises(ImageDecodeError, match=rf"{re.escape(str(truncated))}: truncated_image"):
        captioner([str(encoded), str(truncated)], num_beams=1, max_length=6)
    vqa = pipeline(
        "visual-question-answering", model=str(saved_vqa[1]), pipeline_class=BlipVisualQuestionAnsweringPipeline
    )
    with pytest.raises(ImageDecodeError, match=rf"{re.escape(str(truncated))}: truncated_image"):
        vqa(image=str(truncated), question="what colour is the square ?")


def tokenizer_with_words(*words: str):
    """The tiny tokenizer with `words` in place of its first unused tokens, so the vocabulary size stays 128."""
    vocab = tiny_vocab()
    for index, word in enumerate(words, start=1):
        vocab[vocab.index(f"[unused{index}]")] = word
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def test_image_to_text_strips_the_prompt_at_a_word_boundary(config, monkeypatch):
    tokenizer = tokenizer_with_words("##fering", "view")
    model = BlipForConditionalGeneration(config).eval()
    captioner = BlipImageToTextPipeline(model=model, processor=build_processor(tokenizer, image_size=32))

    def generate_caption(text: str):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        generated = torch.tensor([[tokenizer.bos_token_id, *ids, tokenizer.sep_token_id]])
        monkeypatch.setattr(model, "generate", lambda *args, **kwargs: generated)
        return captioner(random_image(6), prompt="a picture of ")[0]["generated_text"]

    assert generate_caption("a picture offering a view") == "a picture offering a view"
    assert generate_caption("a picture of a view") == "a view"


def test_a_processor_without_the_package_decoder_is_refused_clearly(config, tokenizer):
    """transformers' own BlipProcessor lacks the decoder and the caption rule; the pipeline says what to save."""
    model = BlipForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    foreign = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    captioner = BlipImageToTextPipeline(model=model, processor=foreign)
    with pytest.raises(TypeError, match=r"BlipImageProcessorPil has no `load_image`.*build_processor"):
        captioner(random_image(7))


def test_both_pipelines_work_without_remote_code_when_the_package_is_installed(saved_captioner, saved_vqa):
    import transformers

    captioner_model, captioner_path = saved_captioner
    captioner = transformers.pipeline("image-to-text", model=str(captioner_path))
    assert isinstance(captioner, BlipImageToTextPipeline)
    expected = captioner_model.generate(captioner.preprocess(random_image(5))["pixel_values"], num_beams=1)
    text = captioner.processor.decode_captions(expected)[0]
    assert captioner(random_image(5), num_beams=1) == [{"generated_text": text}]

    _, vqa_path = saved_vqa
    vqa = transformers.pipeline("visual-question-answering", model=str(vqa_path))
    assert isinstance(vqa, BlipVisualQuestionAnsweringPipeline)
    ranked = vqa(image=random_image(6), question="what colour?", candidates=["red", "blue"], top_k=2)
    assert sorted(answer["answer"] for answer in ranked) == ["blue", "red"]
    # Other tasks and other models are transformers' own business, untouched.
    assert not isinstance(
        transformers.pipeline("image-text-to-text", model=str(captioner_path)), BlipImageToTextPipeline
    )


ORDINARY_USE = """
import json, logging, sys, warnings
import transformers_blip
from transformers import pipeline
from transformers.utils import logging as transformers_logging
from transformers_blip import BlipForConditionalGeneration, BlipForQuestionAnswering, BlipImageTextProcessor
from transformers_blip.cli import main
from PIL import Image

transformers_logging.disable_progress_bar()  # progress is not a warning
messages = []
class Collect(logging.Handler):
    def emit(self, record):
        messages.append(f"{record.name}: {record.getMessage()}")
for name in ("", "transformers", "transformers_blip"):
    logging.getLogger(name).addHandler(Collect(level=logging.WARNING))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    captioner_dir, vqa_dir, image_path, folder, output = sys.argv[1:6]
    model = BlipForConditionalGeneration.from_pretrained(captioner_dir)
    processor = BlipImageTextProcessor.from_pretrained(captioner_dir)
    inputs = processor(images=Image.open(image_path), return_tensors="pt")
    model.generate(**inputs)
    model.generate(**inputs, max_new_tokens=8)
    model.generate(**inputs, max_new_tokens=3)
    model.generate(**inputs, do_sample=True, top_p=0.9, max_new_tokens=8)
    prompted = processor(images=Image.open(image_path), text="a picture of", return_tensors="pt")
    model.generate(**prompted, max_new_tokens=8)
    captioner = pipeline("image-to-text", model=captioner_dir)
    captioner(image_path)
    captioner(image_path, max_new_tokens=6)
    vqa = pipeline("visual-question-answering", model=vqa_dir)
    vqa(image=image_path, question="what is it?")
    vqa(image=image_path, question="what is it?", max_new_tokens=4)
    vqa(image=image_path, question="what is it?", candidates=["a cat", "a dog"])
    BlipForQuestionAnswering.from_pretrained(vqa_dir)
    status = main(["caption", folder, "--model", captioner_dir, "--output", output, "--quiet", "--num-workers", "0"])
shown = [f"{w.category.__name__}: {w.message}" for w in caught
         if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
print(json.dumps({"warnings": shown, "logged": messages, "status": status}))
"""


def test_ordinary_use_warns_of_nothing(saved_captioner, saved_vqa, tmp_path):
    """What a new user runs (from_pretrained, generate with its usual options, both pipelines, blip caption), in a
    fresh process: no warning and no logged message the user did nothing to cause."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(2):
        random_image(index).save(folder / f"img{index}.png")
    arguments = [saved_captioner[1], saved_vqa[1], folder / "img0.png", folder, tmp_path / "captions.jsonl"]
    result = subprocess.run(
        [sys.executable, "-c", ORDINARY_USE, *map(str, arguments)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"warnings": [], "logged": [], "status": 0}
    assert "blip caption: captioned 2 image(s)" in result.stdout
