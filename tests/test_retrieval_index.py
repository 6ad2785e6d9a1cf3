"""The image index: ITC features of image files in safetensors, built incrementally and atomically, searched by
text (ITC, then ITM re-ranking) and by image."""

import os

import pytest
import torch
from conftest import make_config, make_tokenizer, random_image

from transformers_blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipModel, build_processor
from transformers_blip.retrieval_index import ImageIndex


@pytest.fixture(scope="module")
def retrieval():
    torch.manual_seed(0)
    return BlipForImageTextRetrieval(make_config()).eval(), build_processor(make_tokenizer(), image_size=32)


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(5):
        random_image(index).save(photos / f"img{index}.png")
    return photos


def direct_features(model, processor, paths):
    from PIL import Image

    images = [Image.open(path).convert("RGB") for path in paths]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.get_image_features(pixels)


def test_build_saves_the_features_of_every_image_and_load_reads_them_back(retrieval, folder, tmp_path):
    model, processor = retrieval
    index_path = tmp_path / "index.safetensors"
    built = ImageIndex.build(model, processor, folder, index_path, batch_size=2)
    paths = sorted(str(path) for path in folder.glob("*.png"))
    assert built.paths == paths and built.embedded == 5 and built.failed == []
    torch.testing.assert_close(built.features, direct_features(model, processor, paths), atol=1e-5, rtol=1e-4)
    loaded = ImageIndex.load(index_path)
    assert loaded.paths == paths and loaded.fingerprint == built.fingerprint
    torch.testing.assert_close(loaded.features, built.features)
    assert not [name for name in os.listdir(tmp_path) if "partial" in name]


def test_rebuilding_embeds_only_new_and_changed_images_and_drops_removed_ones(retrieval, folder, tmp_path):
    model, processor = retrieval
    index_path = tmp_path / "index.safetensors"
    ImageIndex.build(model, processor, folder, index_path)
    random_image(10).save(folder / "new.png")
    random_image(11).save(folder / "img1.png")  # changed: a different image under the same name
    os.utime(folder / "img1.png", ns=(1, 1))
    (folder / "img4.png").unlink()
    rebuilt = ImageIndex.build(model, processor, folder, index_path)
    assert rebuilt.embedded == 2
    assert sorted(os.path.basename(path) for path in rebuilt.paths) == [
        "img0.png",
        "img1.png",
        "img2.png",
        "img3.png",
        "new.png",
    ]
    torch.testing.assert_close(
        rebuilt.features, direct_features(model, processor, rebuilt.paths), atol=1e-5, rtol=1e-4
    )
    assert ImageIndex.build(model, processor, folder, index_path).embedded == 0


def test_text_search_ranks_by_itc_and_reranks_by_itm_probability(retrieval, folder, tmp_path):
    model, processor = retrieval
    index = ImageIndex.build(model, processor, folder, tmp_path / "index.safetensors")
    tokens = processor.tokenizer(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        query = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])[0]
    expected = sorted(zip(index.paths, (index.features @ query).tolist()), key=lambda pair: -pair[1])[:3]
    found = index.search(model, processor, "A red circle!", k=3)
    assert [path for path, _ in found] == [path for path, _ in expected]
    assert [score for _, score in found] == pytest.approx([score for _, score in expected], abs=1e-5)

    reranked = index.search(model, processor, "a red circle", k=3, rerank=True)
    assert sorted(path for path, _ in reranked) == sorted(path for path, _ in found)
    from PIL import Image

    for path, score in reranked:
        pixels = processor(images=Image.open(path).convert("RGB"), text="a red circle", return_tensors="pt")
        with torch.no_grad():
            probability = model(input_ids=pixels["input_ids"], pixel_values=pixels["pixel_values"]).itm_score
        assert score == pytest.approx(float(probability), abs=1e-4)
    assert [score for _, score in reranked] == sorted((score for _, score in reranked), reverse=True)


def test_image_search_finds_the_image_itself_first(retrieval, folder, tmp_path):
    model, processor = retrieval
    index = ImageIndex.build(model, processor, folder, tmp_path / "index.safetensors")
    best, score = index.search_image(model, processor, folder / "img2.png", k=2)[0]
    assert best == str(folder / "img2.png") and score == pytest.approx(1.0, abs=1e-4)


def test_faults_are_named(retrieval, folder, tmp_path):
    model, processor = retrieval
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    index_path = tmp_path / "index.safetensors"
    index = ImageIndex.build(model, processor, [folder, tmp_path / "missing.png"], index_path)
    assert len(index) == 5
    assert {os.path.basename(name) for name, _ in index.failed} == {"broken.png", "missing.png"}

    torch.manual_seed(1)
    other = BlipModel(make_config())
    with pytest.raises(ValueError, match="another model"):
        ImageIndex.build(other, processor, folder, index_path)
    with pytest.raises(ValueError, match="another model"):
        index.search(other, processor, "a circle")
    with pytest.raises(ValueError, match="no ITM head"):
        index.search(other, processor, "a circle", rerank=True)
    with pytest.raises(ValueError, match="no ITC features"):
        ImageIndex.build(BlipForConditionalGeneration(make_config()), processor, folder, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="k must be at least 1"):
        index.search(model, processor, "a circle", k=0)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors: not an image index"):
        ImageIndex.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="cannot read the index"):
        ImageIndex.load(tmp_path / "absent.safetensors")
