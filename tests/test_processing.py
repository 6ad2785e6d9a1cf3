"""The processor and tokenizer: every PIL mode and size, [DEC]/[ENC] ids, pairing checks, caption decoding, and
loading a saved processor in a fresh Python process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from transformers_blip import BlipConfig, BlipForConditionalGeneration, BlipTextConfig, BlipVisionConfig
from transformers_blip.image_processing_blip import BlipImageProcessorAnyMode, to_rgb
from transformers_blip.processing_blip import (
    BlipImageTextProcessor,
    build_processor,
    build_tokenizer,
    decode_captions,
    text_config_token_kwargs,
)

VOCAB_FILE = str(Path(__file__).parent / "fixtures" / "vocab.txt")  # bert-base-uncased's layout, 126 tokens
IMAGE_SIZE = 32
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
CAPTIONS = [
    "a red circle on a blue square",
    "two green triangles next to a small dog",
    "a large cat sitting on the red square",
    "a picture of a blue circle and a green triangle",
    "the dog is on the left of the cat",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(vocab_file=VOCAB_FILE)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return build_processor(tokenizer, image_size=IMAGE_SIZE)


def pixels_of(image_processor, image) -> np.ndarray:
    """The processed image (3, H, W) with normalisation undone, in 0..255."""
    pixel_values = image_processor(image, return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert np.isfinite(pixel_values).all()
    return (pixel_values[0] * CLIP_STD[:, None, None] + CLIP_MEAN[:, None, None]) * 255


def solid(mode: str, colour, size=(10, 7)) -> PIL.Image.Image:
    return PIL.Image.new(mode, size, colour)


def red_palette_image(transparent: bool) -> PIL.Image.Image:
    image = solid("RGB", (255, 0, 0)).convert("P")
    if transparent:
        image.info["transparency"] = image.getpixel((0, 0))  # the red palette entry is see-through
    return image


RED, WHITE = (255, 0, 0), (255, 255, 255)
MODE_CASES = {
    "RGB": (solid("RGB", RED), RED),
    "L": (solid("L", 100), (100, 100, 100)),
    "1": (solid("1", 1), WHITE),
    "LA": (solid("LA", (100, 128)), (177, 177, 177)),  # half-transparent grey on white
    "La": (solid("LA", (100, 0)).convert("La"), WHITE),
    "P": (red_palette_image(transparent=False), RED),
    "P transparent": (red_palette_image(transparent=True), WHITE),
    "PA": (solid("RGBA", (255, 0, 0, 255)).convert("PA"), RED),
    "RGBA opaque": (solid("RGBA", (255, 0, 0, 255)), RED),
    "RGBA half": (solid("RGBA", (255, 0, 0, 128)), (255, 127, 127)),
    "RGBA clear": (solid("RGBA", (255, 0, 0, 0)), WHITE),
    "RGBa": (solid("RGBA", (255, 0, 0, 128)).convert("RGBa"), (255, 127, 127)),
    "RGBX": (solid("RGB", RED).convert("RGBX"), RED),
    "CMYK": (solid("RGB", RED).convert("CMYK"), RED),
    "CMYK native": (solid("CMYK", (0, 255, 255, 0)), RED),
    "YCbCr": (solid("RGB", RED).convert("YCbCr"), RED),
    "HSV": (solid("RGB", RED).convert("HSV"), RED),
    "I;16": (solid("I;16", 32896), (128, 128, 128)),  # 32896 / 65535 = 128 / 255
    "I;16B": (PIL.Image.frombytes("I;16B", (4, 4), np.full((4, 4), 65535, ">u2").tobytes()), WHITE),
    "I": (solid("I", 32896), (128, 128, 128)),  # 16-bit data, like "I;16"
    "I dark": (solid("I", 100), (0, 0, 0)),  # 100 / 65535: a dark 16-bit frame stays dark
    "I above 16 bits": (solid("I", 100_000), WHITE),
    "F": (solid("F", 0.5), (128, 128, 128)),
    "F above 1": (solid("F", 200.0), WHITE),
    "F negative": (solid("F", -3.0), (0, 0, 0)),
}


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_pil_mode_gives_the_right_rgb_colour(processor, case):
    image, expected_rgb = MODE_CASES[case]
    pixels = pixels_of(processor.image_processor, image)
    # A solid image stays solid through the bicubic resize; allow for 8-bit rounding.
    np.testing.assert_allclose(pixels.reshape(3, -1).mean(1), expected_rgb, atol=1.5)
    np.testing.assert_allclose(pixels.reshape(3, -1).std(1), 0, atol=0.5)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_gradient_keeps_its_gradient(processor, mode):
    ramp = np.tile(np.linspace(0, 65535, 64), (16, 1))  # left black, right white
    if mode == "I;16":
        image = PIL.Image.fromarray(ramp.astype(np.uint16))
    elif mode == "I":
        image = PIL.Image.fromarray(ramp.astype(np.int32))
    else:
        image = PIL.Image.fromarray((ramp / 65535).astype(np.float32))
    assert image.mode == mode
    grey = pixels_of(processor.image_processor, image)[0]
    column_means = grey.mean(0)
    assert np.all(np.diff(column_means) > 0), "brightness must rise from left to right"
    assert column_means[0] < 10 and column_means[-1] > 245
    assert abs(grey.mean() - 127.5) < 5, "a 16-bit ramp must not be clipped to white"


def test_high_bit_depth_scale_is_fixed_by_the_mode():
    """The white point depends on the mode, not on the pixels: values map linearly and clip outside the range."""

    def grey(pixels: np.ndarray) -> list[int]:
        return np.asarray(to_rgb(PIL.Image.fromarray(pixels)))[0, :, 0].tolist()

    assert grey(np.array([[0, 257, 30000, 65535]], dtype=np.uint16)) == [0, 1, 117, 255]
    assert grey(np.array([[-1000, 0, 30000, 70000]], dtype=np.int32)) == [0, 0, 117, 255]
    assert grey(np.array([[np.nan, -1.0, 0.5, 1.0, 7.0]], dtype=np.float32)) == [0, 0, 128, 255, 255]
    rgb = solid("RGB", RED)
    assert to_rgb(rgb) is rgb


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (1000, 1), (1, 1000), (513, 17)])
def test_any_size_is_resized_to_the_model_size(processor, size):
    pixels = pixels_of(processor.image_processor, solid("RGB", (0, 255, 0), size=size))
    np.testing.assert_allclose(pixels.reshape(3, -1).mean(1), (0, 255, 0), atol=1.5)


def test_arrays_and_tensors_follow_transformers_conventions(processor):
    red_hwc = np.zeros((5, 4, 3), dtype=np.uint8)
    red_hwc[..., 0] = 255
    red_chw = torch.from_numpy(red_hwc).permute(2, 0, 1).contiguous()
    for image in (red_hwc, red_chw, red_hwc.astype(np.float32)):
        np.testing.assert_allclose(pixels_of(processor.image_processor, image).reshape(3, -1).mean(1), RED, atol=1.5)
    batch = processor(images=torch.stack([red_chw, red_chw]), return_tensors="pt")["pixel_values"]
    assert batch.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


@pytest.mark.parametrize("image", [PIL.Image.new("RGB", (0, 5)), np.zeros((5, 0, 3), dtype=np.uint8)])
def test_an_image_without_pixels_is_rejected(processor, image):
    with pytest.raises(ValueError, match="no pixels"):
        processor(images=image)


def test_tokenizer_from_vocab_file_has_blip_ids(tokenizer):
    assert len(tokenizer) == 128
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 126
    assert tokenizer.convert_tokens_to_ids("[ENC]") == 127
    # The fixture has bert-base-uncased's layout, so the ids are BlipTextConfig's defaults at vocab size 128.
    kwargs = text_config_token_kwargs(tokenizer)
    assert kwargs == {
        "vocab_size": 128,
        "pad_token_id": 0,
        "sep_token_id": 102,
        "decoder_bos_token_id": 126,
        "encoder_token_id": 127,
    }
    default_config = BlipTextConfig(vocab_size=128)
    assert {name: getattr(default_config, name) for name in kwargs} == kwargs

    ids = tokenizer("A Picture of red circles.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a picture of red circles."


def test_vocab_file_that_already_ends_with_dec_and_enc_keeps_their_ids(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text(Path(VOCAB_FILE).read_text() + "[DEC]\n[ENC]\n\n")
    tokenizer = build_tokenizer(vocab_file=str(vocab_file))
    assert len(tokenizer) == 128
    assert text_config_token_kwargs(tokenizer)["decoder_bos_token_id"] == tokenizer.bos_token_id == 126
    assert tokenizer.decode([126, 104, 127, 120], skip_special_tokens=True) == "a dog"


def test_trained_tokenizer_puts_dec_and_enc_last():
    tokenizer = build_tokenizer(corpus=iter(CAPTIONS * 3), vocab_size=80)
    assert len(tokenizer) <= 82
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(tokenizer) - 2, len(tokenizer) - 1]
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 1, 2, 3, 4]
    for caption in CAPTIONS:
        ids = tokenizer(caption)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption

    text_config = BlipTextConfig(**text_config_token_kwargs(tokenizer))
    assert text_config.vocab_size == len(tokenizer)
    assert text_config.sep_token_id == text_config.eos_token_id == 3
    assert text_config.bos_token_id == text_config.decoder_bos_token_id == len(tokenizer) - 2
    assert text_config.encoder_token_id == len(tokenizer) - 1


def test_build_tokenizer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        build_tokenizer()
    with pytest.raises(ValueError, match="exactly one"):
        build_tokenizer(vocab_file=VOCAB_FILE, corpus=CAPTIONS)
    with pytest.raises(ValueError, match="single string"):
        build_tokenizer(corpus="a red circle")
    no_specials = tmp_path / "no_specials.txt"
    no_specials.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"\[CLS\]"):
        build_tokenizer(vocab_file=str(no_specials))
    dec_in_the_middle = tmp_path / "dec_in_the_middle.txt"
    dec_in_the_middle.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n[DEC]\nhello\n")
    with pytest.raises(ValueError, match="last two ids"):
        build_tokenizer(vocab_file=str(dec_in_the_middle))


def test_processor_gives_blip_inputs(processor):
    images = [solid("RGB", RED), solid("I;16", 1000, size=(3, 50))]
    inputs = processor(
        images=images,
        text=["a picture of a red circle", "a dog"],
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=6,
    )
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}
    assert inputs["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (2, 6)
    assert inputs["input_ids"][:, 0].tolist() == [101, 101]  # [CLS]; the models swap in [ENC] or [DEC]
    assert inputs["input_ids"][0, -1] == 102  # truncated, still ends with [SEP]
    assert inputs["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert isinstance(processor, BlipImageTextProcessor)
    assert isinstance(processor.image_processor, BlipImageProcessorAnyMode)


@pytest.mark.parametrize(
    "images, text, counts",
    [
        ([solid("RGB", RED)] * 2, ["a dog", "a cat", "a red circle"], "2 images and 3 texts"),
        ([solid("RGB", RED)] * 3, "a dog", "3 images and 1 texts"),
        (solid("RGB", RED), ["a dog", "a cat"], "1 images and 2 texts"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a dog"], "2 images and 1 texts"),
    ],
)
def test_mismatched_image_and_text_counts_raise(processor, images, text, counts):
    with pytest.raises(ValueError, match=counts):
        processor(images=images, text=text)


def test_decode_captions_strips_special_tokens_and_prompt(tokenizer, processor):
    prompt = "a picture of "
    caption_ids = tokenizer("a picture of a red circle", add_special_tokens=False)["input_ids"]
    dec, sep, pad = tokenizer.bos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    generated = torch.tensor([[dec, *caption_ids, sep, pad], [dec, *caption_ids[:4], sep, pad, pad, pad]])
    assert decode_captions(tokenizer, generated) == ["a picture of a red circle", "a picture of a"]
    assert decode_captions(processor, generated, prompt=prompt) == ["a red circle", "a"]
    assert processor.decode_captions(generated.tolist(), prompt="A Picture of") == ["a red circle", "a"]
    unrelated_prompt = decode_captions(tokenizer, generated, prompt="a photo of ")
    assert unrelated_prompt == ["a picture of a red circle", "a picture of a"]


def test_a_model_built_for_a_trained_tokenizer_trains_and_captions():
    tokenizer = build_tokenizer(corpus=CAPTIONS, vocab_size=100)
    processor = build_processor(tokenizer, image_size=IMAGE_SIZE)
    text = BlipTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **text_config_token_kwargs(tokenizer),
    )
    vision = BlipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision)).eval()
    inputs = processor(images=[solid("RGB", RED), solid("L", 9)], text=CAPTIONS[:2], padding=True, return_tensors="pt")
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)

    prompt = "a picture of "
    prompts = processor(text=[prompt, prompt], return_tensors="pt")
    generated = model.generate(
        inputs["pixel_values"], input_ids=prompts["input_ids"], num_beams=1, max_new_tokens=4, min_new_tokens=0
    )
    assert generated[:, 0].tolist() == [tokenizer.bos_token_id] * 2
    captions = processor.decode_captions(generated, prompt=prompt)
    full_texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert len(captions) == 2
    for caption, full in zip(captions, full_texts):
        assert full.startswith("a picture of")
        rest = full[len("a picture of") :]
        if rest[:1].isalnum():  # the decoder continued the prompt's last word ("of" -> "oft"): nothing to strip
            assert caption == full
        else:
            assert caption == rest.strip()


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs `code` in a new interpreter, offline, with the remote-code module cache inside `cwd`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


LOAD_AND_PROCESS = """
import sys
import numpy as np
import PIL.Image
from transformers import AutoProcessor

processor = AutoProcessor.from_pretrained("saved", {kwargs})
images = [PIL.Image.open(f"image_{{i}}.png") for i in range(3)]
inputs = processor(images=images, text={texts!r}, padding="max_length", max_length=12, return_tensors="np")
np.savez("{output}", **inputs)
print(type(processor).__name__, type(processor.image_processor).__name__, "transformers_blip" in sys.modules)
"""


def save_inputs(tmp_path: Path) -> list[PIL.Image.Image]:
    ramp = np.tile(np.linspace(0, 65535, 40), (20, 1)).astype(np.uint16)
    images = [solid("RGBA", (255, 0, 0, 128)), PIL.Image.fromarray(ramp), red_palette_image(transparent=True)]
    for index, image in enumerate(images):
        image.save(tmp_path / f"image_{index}.png")
    return [PIL.Image.open(tmp_path / f"image_{index}.png") for index in range(len(images))]


def test_saved_processor_loads_in_a_fresh_process_without_the_package(processor, tmp_path):
    processor.save_pretrained(tmp_path / "saved")
    images, texts = save_inputs(tmp_path), ["a red circle", "a picture of a dog", "the cat"]
    expected = processor(images=images, text=texts, padding="max_length", max_length=12, return_tensors="np")

    # Without our package, the saved source files are the processor's code: it needs trust_remote_code.
    refused = run_python(LOAD_AND_PROCESS.format(kwargs="", texts=texts, output="refused"), cwd=tmp_path)
    assert refused.returncode != 0 and "trust_remote_code" in refused.stderr

    code = LOAD_AND_PROCESS.format(kwargs="trust_remote_code=True", texts=texts, output="remote")
    remote = run_python(code, cwd=tmp_path)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout.split() == ["BlipImageTextProcessor", "BlipImageProcessorAnyMode", "False"]
    loaded = np.load(tmp_path / "remote.npz")
    assert set(loaded.files) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
    saved_config = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved_config["image_processor"]["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}


def test_saved_processor_loads_with_the_package_without_remote_code(processor, tmp_path):
    processor.save_pretrained(tmp_path / "saved")
    images, texts = save_inputs(tmp_path), ["a", "b", "c"]
    expected = processor(images=images, text=texts, padding="max_length", max_length=12, return_tensors="np")
    code = "import transformers_blip\n" + LOAD_AND_PROCESS.format(kwargs="", texts=texts, output="local")
    local = run_python(code, cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    assert local.stdout.split() == ["BlipImageTextProcessor", "BlipImageProcessorAnyMode", "True"]
    loaded = np.load(tmp_path / "local.npz")
    for name in expected:
        np.testing.assert_array_equal(loaded[name], expected[name], err_msg=name)
