"""One image decoder: training (`data.load_image`) and inference (the processor) give the same pixels for every PIL
mode, from memory and from files; the processor refuses bombs and names broken files."""

import io
import urllib.error
import urllib.request

import numpy as np
import PIL.Image
import pytest
from test_data_decoding import png_bomb

from transformers_blip import image_processing_blip
from transformers_blip.data import (
    BadSampleError,
    BlipEvalTransform,
    BlipTrainTransform,
    decoding,
    load_image,
    transforms,
)
from transformers_blip.image_processing_blip import DEFAULT_MAX_PIXELS, ImageDecodeError

WHITE = (255, 255, 255)
RED = (255, 0, 0)
GREY_30000 = (117, 117, 117)  # 30000 / 65535 * 255, as 16-bit data
SIZE = (12, 10)


def constant(mode: str, value) -> PIL.Image.Image:
    return PIL.Image.new(mode, SIZE, value)


# Constant images and the colour docs/processing.md promises for them.
CONSTANT_CASES = {
    "1": (constant("1", 1), WHITE),
    "L": (constant("L", 100), (100, 100, 100)),
    "LA": (constant("LA", (0, 0)), WHITE),  # fully transparent black: the hidden colour is not shown
    "P": (constant("RGB", RED).convert("P"), RED),
    "PA": (constant("RGBA", (0, 0, 255, 0)).convert("PA"), WHITE),
    "RGBA": (constant("RGBA", (0, 0, 0, 0)), WHITE),
    "CMYK": (constant("CMYK", (0, 255, 255, 0)), RED),
    "YCbCr": (constant("RGB", RED).convert("YCbCr"), RED),
    "I;16": (constant("I;16", 30000), GREY_30000),
    "I": (constant("I", 30000), GREY_30000),
    "F": (constant("F", 0.5), (128, 128, 128)),
}
MODES = list(CONSTANT_CASES)


def varied(mode: str) -> PIL.Image.Image:
    """An image of `mode` whose pixels (and alpha, where the mode has one) differ from pixel to pixel."""
    rng = np.random.default_rng(0)
    shape = (SIZE[1], SIZE[0])
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65536, shape, dtype=np.uint16))
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(-500, 70000, shape).astype(np.int32))
    if mode == "F":
        return PIL.Image.fromarray(rng.uniform(-0.2, 1.2, shape).astype(np.float32))
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (*shape, 4), dtype=np.uint8))
    return rgba.convert(mode)


def tiff_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF")  # TIFF keeps every one of these modes as it is
    return buffer.getvalue()


def pillow_reads_its_ycbcr_tiff() -> bool:
    """Whether this Pillow reads back the YCbCr TIFF it writes."""
    image = PIL.Image.new("YCbCr", (4, 2), (90, 100, 200))
    try:
        return PIL.Image.open(io.BytesIO(tiff_bytes(image))).convert("YCbCr").tobytes() == image.tobytes()
    except OSError:
        return False


def pixel_values(processor, images) -> np.ndarray:
    return processor(images=images, return_tensors="np")["pixel_values"]


def test_there_is_one_conversion():
    assert decoding.to_rgb is transforms.to_rgb is image_processing_blip.to_rgb
    assert decoding.DEFAULT_MAX_PIXELS == image_processing_blip.BlipImageProcessorAnyMode.max_pixels


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_has_its_documented_colour_in_training_and_inference(processor, mode):
    image, expected = CONSTANT_CASES[mode]
    assert image.mode == mode
    training = load_image(image, min_side=1)
    assert training.mode == "RGB"
    tolerance = 1 if mode == "YCbCr" else 0  # YCbCr <-> RGB rounds
    np.testing.assert_allclose(np.asarray(training).reshape(-1, 3), [expected] * (SIZE[0] * SIZE[1]), atol=tolerance)
    np.testing.assert_array_equal(pixel_values(processor, image), pixel_values(processor, training))


@pytest.mark.parametrize("mode", MODES)
def test_training_and_inference_give_the_same_pixels_from_memory_and_from_files(processor, mode, tmp_path):
    image = varied(mode)
    assert image.mode == mode
    path = tmp_path / f"image_{mode.replace(';', '_')}.tiff"
    path.write_bytes(tiff_bytes(image))

    if mode == "YCbCr" and not pillow_reads_its_ycbcr_tiff():
        # Pillow 12 reads a YCbCr TIFF's three samples as four (fixed in 13; Gradio 6 keeps the [app] extra on 12):
        # the file must then be refused by name, never decoded into wrong pixels.
        for source in (path, path.read_bytes()):
            with pytest.raises(BadSampleError, match="truncated_image"):
                load_image(source, min_side=1)
        return
    training = [load_image(image, min_side=1), load_image(path, min_side=1), load_image(path.read_bytes(), min_side=1)]
    for decoded in training[1:]:
        np.testing.assert_array_equal(np.asarray(decoded), np.asarray(training[0]))
    expected = pixel_values(processor, training[0])
    for inference_input in (image, PIL.Image.open(path), str(path), path, path.read_bytes()):
        np.testing.assert_array_equal(pixel_values(processor, inference_input), expected)


@pytest.mark.parametrize("mode", MODES)
def test_training_transforms_convert_undecoded_images_as_the_decoder_does(mode):
    """Images that skipped `load_image` (a dataset's own decoded column) still get the decoder's conversion."""
    image = varied(mode)
    decoded = load_image(image, min_side=1)
    evaluate = BlipEvalTransform(image_size=16, return_tensors=None)
    np.testing.assert_array_equal(np.asarray(evaluate(image)), np.asarray(evaluate(decoded)))
    train = BlipTrainTransform(image_size=16, seed=0, return_tensors=None)
    from_raw = np.asarray(train(image))
    train = BlipTrainTransform(image_size=16, seed=0, return_tensors=None)
    np.testing.assert_array_equal(from_raw, np.asarray(train(decoded)))


def test_a_transparent_key_colour_is_white(processor, tmp_path):
    """PNG's tRNS: RGB and grey images (8 or 16 bits) with one colour marked transparent."""
    rgb = PIL.Image.new("RGB", SIZE, RED)
    rgb.paste((0, 0, 255), (0, 0, 6, 10))  # blue, the transparent colour, on the left
    grey = PIL.Image.fromarray(np.where(np.arange(SIZE[0]) < 6, 1000, 30000).astype(np.uint16)[None].repeat(10, 0))
    for image, key, right in ((rgb, (0, 0, 255), RED), (rgb.convert("L"), 29, (76, 76, 76)), (grey, 1000, GREY_30000)):
        path = tmp_path / f"key_{image.mode.replace(';', '_')}.png"
        image.save(path, transparency=key)
        decoded = load_image(path)
        pixels = np.asarray(decoded)
        assert tuple(pixels[0, 0]) == WHITE and tuple(pixels[0, -1]) == right, image.mode
        np.testing.assert_array_equal(pixel_values(processor, str(path)), pixel_values(processor, decoded))


def test_urls_are_fetched_then_decoded_like_files(processor, monkeypatch):
    encoded = tiff_bytes(constant("I;16", 30000))
    requested = []

    class Response(io.BytesIO):
        def __exit__(self, *args):
            self.close()

    def fake_urlopen(url, timeout=None):
        requested.append((url, timeout))
        if url.endswith("missing.tiff"):
            raise urllib.error.URLError("404")
        return Response(encoded)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    image = processor.image_processor.load_image("https://example.com/scan.tiff", timeout=3.0)
    assert requested == [("https://example.com/scan.tiff", 3.0)]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(load_image(encoded)))
    with pytest.raises(ImageDecodeError, match=r"https://example\.com/missing\.tiff: missing_file"):
        processor(images="https://example.com/missing.tiff")


def test_processor_refuses_a_bomb_before_decoding_it(processor, tmp_path):
    # Just over the limit: PIL only warns about it when opening, and decoding would need about 270 MB.
    side = int(DEFAULT_MAX_PIXELS**0.5) + 1
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(side, side))
    with pytest.warns(PIL.Image.DecompressionBombWarning):
        lazy = PIL.Image.open(path)
    for source in (lazy, str(path)):
        with pytest.raises(ImageDecodeError, match=rf"bomb\.png: too_large \({side}x{side} pixels"):
            processor(images=source, return_tensors="np")
    huge = tmp_path / "huge.png"  # far larger: PIL refuses even to open it
    huge.write_bytes(png_bomb())
    with pytest.raises(ImageDecodeError, match=r"huge\.png: too_large"):
        processor(images=str(huge))


def test_processor_limit_can_be_lowered(processor):
    image = PIL.Image.new("RGB", (40, 40))
    assert pixel_values(processor, image).shape == (1, 3, 32, 32)
    processor.image_processor.max_pixels = 1000
    with pytest.raises(ImageDecodeError, match=r"<PIL image>: too_large \(40x40 pixels, limit 1000\)"):
        processor(images=image)


def test_processor_names_a_truncated_file(processor, tmp_path):
    buffer = io.BytesIO()
    varied("RGB").resize((64, 64)).save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    for source in (PIL.Image.open(path), str(path)):
        with pytest.raises(ImageDecodeError, match=r"cut\.png: truncated_image"):
            processor(images=source)
    # Training reports the same file and reason, as a skippable sample.
    with pytest.raises(BadSampleError, match=r"cut\.png: truncated_image"):
        load_image(path)


def test_exif_orientation_is_applied_to_files_and_open_images(processor, tmp_path):
    image = PIL.Image.new("RGB", (20, 10), RED)
    image.paste((0, 0, 255), (0, 0, 10, 10))  # blue left half
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (10, 20)
    assert np.asarray(upright)[2, 5, 2] > 200  # blue on top after the rotation
    np.testing.assert_array_equal(pixel_values(processor, PIL.Image.open(path)), pixel_values(processor, upright))
