"""CapFilt: the filter's decisions, determinism (batch size, sharding, ranks, SIGKILL and restart), skips, the output
read back for pretraining, the report. Tiny random models; the synthetic benchmark's web split at 32px."""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_config, make_tokenizer
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from transformers_blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, build_processor
from transformers_blip.benchmark import build_synthetic_benchmark, write_webdataset_shards
from transformers_blip.capfilt import (
    CapFiltSettings,
    bootstrap,
    caption_seed,
    dataset_shards,
    iter_scores,
    webdataset_shards,
    write_report,
)
from transformers_blip.data import DecodeImages, capfilt_files, load_capfilt_output, read_capfilt_manifest
from transformers_blip.training import load_pretraining_pairs

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "training_scripts" / "capfilt.py"
NUM_WEB = 8
SHARD_SIZE = 2  # four shards: a kill after the first leaves most of the work undone
THRESHOLD = 0.5


@pytest.fixture(scope="module")
def processor():
    return build_processor(make_tokenizer(), image_size=32)


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    return BlipForConditionalGeneration(make_config()).eval()


@pytest.fixture(scope="module")
def random_filter(web, processor):
    """Random weights, the ITM head scaled and shifted so that the web captions' match probabilities spread around
    0.5 (a random head gives every text nearly the same)."""
    torch.manual_seed(1)
    model = BlipForImageTextRetrieval(make_config()).eval()
    pixels = processor.image_processor(images=list(web["image"]), return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(list(web["caption"]), padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        model.itm_head.weight.mul_(300.0)
        logits = model(tokens["input_ids"], pixels, attention_mask=tokens["attention_mask"]).itm_logits
        model.itm_head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    return model


@pytest.fixture(scope="module")
def web():
    benchmark = build_synthetic_benchmark(
        num_human=1, num_web=NUM_WEB, num_val=1, num_test=1, num_vqa=3, num_nlvr=1, image_size=32
    )
    return benchmark["web"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, captioner, random_filter, processor):
    root = tmp_path_factory.mktemp("models")
    for name, model in (("captioner", captioner), ("filter", random_filter)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return root / "captioner", root / "filter"


def script_command(model_dirs, output_dir, *extra):
    captioner, filter_model = model_dirs
    return [
        "--captioner", str(captioner), "--filter", str(filter_model), "--output_dir", str(output_dir),
        "--synthetic_num_web", str(NUM_WEB), "--synthetic_image_size", "32", "--shard_size", str(SHARD_SIZE),
        "--threshold", str(THRESHOLD), "--num_captions", "2", "--batch_size", "3", *extra,
    ]  # fmt: skip


def run_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def visible_files(directory: Path) -> dict[str, bytes]:
    """The run's output files and their bytes (hidden temporaries and the report aside)."""
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_dirs):
    """One uninterrupted run of the script, with a DataLoader worker decoding the images."""
    output_dir = tmp_path_factory.mktemp("reference") / "out"
    command = [sys.executable, str(SCRIPT), *script_command(model_dirs, output_dir, "--num_workers", "1")]
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result.stdout


# ---------------------------------------------------------------------------------------------------------------
# The filter's decisions on a constructed case
# ---------------------------------------------------------------------------------------------------------------

MATCH_LOGIT = (31 / 32) / math.sqrt(992 / 32**3)  # layer norm of c * e_0 in 32 dimensions, dimension 0


def word_reading_filter(tokenizer) -> BlipForImageTextRetrieval:
    """A filter whose ITM match logit is +MATCH_LOGIT for a text with "red", -MATCH_LOGIT for one with "blue".

    Every embedding is zero but those two words' (+-e_0); the first self-attention averages the tokens (zero
    queries, identity values and output); cross-attention, feed-forward and the second layer add nothing; the head
    reads dimension 0. Layer norms keep the direction: the [ENC] state is the word's normalised embedding.
    """
    torch.manual_seed(2)
    model = BlipForImageTextRetrieval(make_config()).eval()
    encoder = model.text_encoder
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.zero_()
        for name, parameter in encoder.named_parameters():
            if name.endswith("LayerNorm.weight"):
                parameter.fill_(1.0)
        red, blue = tokenizer.convert_tokens_to_ids(["red", "blue"])
        encoder.embeddings.word_embeddings.weight[red, 0] = 10.0
        encoder.embeddings.word_embeddings.weight[blue, 0] = -10.0
        attention = encoder.encoder.layer[0].attention
        attention.self.value.weight.copy_(torch.eye(32))
        attention.output.dense.weight.copy_(torch.eye(32))
        model.itm_head.weight.zero_()
        model.itm_head.bias.zero_()
        model.itm_head.weight[1, 0] = 1.0
    return model


def one_image_dataset(captions: list[str], web) -> Dataset:
    images = web.cast_column("image", ImageFeature(decode=False))["image"][: len(captions)]
    return Dataset.from_dict(
        {"image": images, "caption": captions, "image_id": list(range(len(captions)))},
        features=Features(
            {"image": ImageFeature(decode=False), "caption": Value("string"), "image_id": Value("int64")}
        ),
    )


def test_the_filter_keeps_the_matched_text_and_drops_the_mismatched(tmp_path, captioner, processor, web):
    filter_model = word_reading_filter(processor.tokenizer)
    dataset = one_image_dataset(["a red square", "a blue square"], web)
    settings = CapFiltSettings(num_captions=0)
    summary = bootstrap(
        dataset_shards(dataset), captioner, processor, filter_model, processor, tmp_path, settings,
        num_workers=0, progress=False,
    )  # fmt: skip
    scores = {score["text"]: score for score in iter_scores(tmp_path)}
    expected = 1 / (1 + math.exp(-MATCH_LOGIT))
    assert scores["a red square"]["itm_score"] == pytest.approx(expected, abs=1e-4)
    assert scores["a blue square"]["itm_score"] == pytest.approx(1 - expected, abs=1e-4)
    assert scores["a red square"]["kept"] and not scores["a blue square"]["kept"]
    records = load_capfilt_output(tmp_path).to_list()
    assert [(r["caption"], r["source"], r["key"]) for r in records] == [("a red square", "web", "0")]
    assert records[0]["image_texts_scored"] == 1 and records[0]["image_texts_kept"] == 1
    assert summary.texts_kept == {"web": 1, "synthetic": 0} and summary.kept_fraction("web") == 0.5


def test_scores_equal_the_models_own_forward(tmp_path, captioner, random_filter, processor, web):
    """The batched scoring (image keys/values once for its texts, fixed padding) is the head's forward, pair by
    pair: ITM probability and the ITC similarity of the pair."""
    settings = CapFiltSettings(num_captions=2, threshold=0.0)
    bootstrap(
        dataset_shards(web.select(range(3))), captioner, processor, random_filter, processor, tmp_path, settings,
        num_workers=0, progress=False,
    )  # fmt: skip
    scores = list(iter_scores(tmp_path))
    assert [s["source"] for s in scores] == ["web", "synthetic", "synthetic"] * 3
    assert all(s["kept"] for s in scores)
    pixel_values = processor.image_processor(images=list(web.select(range(3))["image"]), return_tensors="pt")
    pixels = pixel_values["pixel_values"].repeat_interleave(3, dim=0)
    tokens = processor.tokenizer(
        [s["text"] for s in scores], padding="longest", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        output = random_filter(tokens["input_ids"], pixels, attention_mask=tokens["attention_mask"])
    assert torch.allclose(torch.tensor([s["itm_score"] for s in scores]), output.itm_score, atol=1e-5)
    assert torch.allclose(torch.tensor([s["itc_similarity"] for s in scores]), output.itc_similarity.diag(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------------


def test_the_output_does_not_depend_on_batch_size_or_sharding(tmp_path, captioner, random_filter, processor, web):
    settings = CapFiltSettings(num_captions=2, threshold=THRESHOLD)

    def run(name: str, batch_size: int, shard_size: int) -> Path:
        bootstrap(
            dataset_shards(web, shard_size), captioner, processor, random_filter, processor, tmp_path / name,
            settings, batch_size=batch_size, num_workers=0, progress=False,
        )  # fmt: skip
        return tmp_path / name

    one, five = run("batch1", 1, 4), run("batch5", 5, 4)
    assert visible_files(one) == visible_files(five)
    records = load_capfilt_output(one).to_list()
    assert records == load_capfilt_output(run("shards", 4, 7)).to_list()
    kept, scored = {r["source"] for r in records}, list(iter_scores(one))
    assert kept == {"web", "synthetic"} and not all(s["kept"] for s in scored)  # a real mixture was filtered
    # Sampling, not one fixed caption: an image's two samples differ somewhere.
    synthetic = [s["text"] for s in scored if s["source"] == "synthetic"]
    assert any(a != b for a, b in zip(synthetic[::2], synthetic[1::2]))


def test_caption_seeds_depend_on_seed_key_and_caption_number():
    seeds = {caption_seed(0, "a", 0), caption_seed(0, "a", 1), caption_seed(0, "b", 0), caption_seed(1, "a", 0)}
    assert len(seeds) == 4 and caption_seed(0, "a", 0) == caption_seed(0, "a", 0)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_a_restart_with_other_settings_is_refused(tmp_path, captioner, random_filter, processor, web):
    shards = dataset_shards(web.select(range(2)))
    bootstrap(shards, captioner, processor, random_filter, processor, tmp_path, num_workers=0, progress=False)
    with pytest.raises(ValueError, match="threshold"):
        bootstrap(
            shards, captioner, processor, random_filter, processor, tmp_path, CapFiltSettings(threshold=0.9),
            num_workers=0, progress=False,
        )  # fmt: skip


def test_a_killed_runs_half_written_files_are_removed_when_their_shard_is_redone(
    tmp_path, captioner, random_filter, processor, web
):
    stale = [tmp_path / ".data-00000.parquet.partial-123-abcd", tmp_path / ".shard-00000.json.partial-123-ef01"]
    for path in stale:
        path.write_bytes(b"half")
    other = tmp_path / ".data-00001.parquet.partial-9-beef"  # another shard's: left to its own rank
    other.write_bytes(b"half")
    shards = dataset_shards(web.select(range(1)))
    bootstrap(shards, captioner, processor, random_filter, processor, tmp_path, num_workers=0, progress=False)
    assert not any(path.exists() for path in stale) and other.exists()
    assert (tmp_path / "manifest.json").exists()


def test_a_sigkilled_run_restarted_ends_byte_identical(tmp_path, model_dirs, reference_run):
    reference_dir, _ = reference_run
    output_dir = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), *script_command(model_dirs, output_dir, "--num_workers", "0")]
    log = tmp_path / "killed.log"  # a file, not a pipe, which a chatty child could fill and block on
    with open(log, "wb") as stderr:
        child = subprocess.Popen(command, env=run_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    first_marker = output_dir / "shard-00000.json"
    deadline = time.monotonic() + 240
    while not first_marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, f"the run ended before it could be killed: {log.read_text()[-3000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (output_dir / "manifest.json").exists()
    assert len(list(output_dir.glob("shard-*.json"))) < NUM_WEB // SHARD_SIZE
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already committed" in result.stdout and "(0 already committed)" not in result.stdout
    assert visible_files(output_dir) == visible_files(reference_dir)
    assert not list(output_dir.glob(".*partial*"))  # what the killed run left half-written is gone


def test_two_ranks_cover_every_image_once_and_write_what_one_process_writes(tmp_path, model_dirs, reference_run):
    reference_dir, _ = reference_run
    output_dir = tmp_path / "out"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
        *script_command(model_dirs, output_dir, "--num_workers", "0"),
    ]  # fmt: skip
    result = subprocess.run(command, env=run_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"{NUM_WEB // SHARD_SIZE // 2} shards done here") == 2  # each rank did half
    web_keys = [s["key"] for s in iter_scores(output_dir) if s["source"] == "web"]
    assert len(web_keys) == NUM_WEB == len(set(web_keys))
    assert visible_files(output_dir) == visible_files(reference_dir)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs, formats, reading back
# ---------------------------------------------------------------------------------------------------------------


def test_broken_images_and_empty_captions_are_skipped_and_counted(tmp_path, captioner, random_filter, processor, web):
    good = one_image_dataset(["a red square", "a blue circle"], web).to_list()
    broken = {"image": {"bytes": b"\x89PNG not really", "path": None}, "caption": "a green square", "image_id": 7}
    truncated_bytes = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(truncated_bytes, format="PNG")
    cut = truncated_bytes.getvalue()[: len(truncated_bytes.getvalue()) // 2]
    truncated = {"image": {"bytes": cut, "path": None}, "caption": "red", "image_id": 8}
    empty = {**good[1], "caption": "   ", "image_id": 9}
    missing = {"image": {"bytes": None, "path": str(tmp_path / "gone.png")}, "caption": "red", "image_id": 10}
    rows = [good[0], broken, truncated, empty, missing, good[1]]
    features = Features({"image": ImageFeature(decode=False), "caption": Value("string"), "image_id": Value("int64")})
    dataset = Dataset.from_list(rows, features=features)
    shards = dataset_shards(dataset, 4)
    summary = bootstrap(
        shards, captioner, processor, random_filter, processor, tmp_path / "out", num_workers=1, progress=False
    )
    reasons = sorted(entry["reason"] for entry in summary.skipped)
    assert reasons == ["empty_caption", "missing_file", "truncated_image", "unreadable_image"]
    assert summary.images == 2
    manifest = read_capfilt_manifest(tmp_path / "out")
    assert manifest["totals"]["skipped"] == 4 and manifest["totals"]["images"] == 2
    assert {s["key"] for s in iter_scores(tmp_path / "out")} == {"0", "1"}
    page = write_report(tmp_path / "out", shards).read_text(encoding="utf-8")
    assert "skipped: 1 empty_caption, 1 missing_file, 1 truncated_image, 1 unreadable_image" in page
    assert f"{tmp_path / 'gone.png'}: missing_file" in page


def test_pretraining_reads_the_output_as_its_training_pairs(reference_run):
    output_dir, _ = reference_run
    manifest = read_capfilt_manifest(output_dir)
    files = [str(path) for path in capfilt_files(output_dir)]
    pairs, held_out = load_pretraining_pairs("parquet", files)
    assert held_out is None and len(pairs) == manifest["totals"]["records"] > 0
    assert {"image", "caption", "image_id", "source", "itm_score"} <= set(pairs.column_names)
    assert set(pairs["source"]) <= {"web", "synthetic"} and min(pairs["itm_score"]) >= THRESHOLD
    pairs.set_transform(DecodeImages())
    assert pairs[0]["image"].size == (32, 32)


def test_an_altered_output_file_is_refused(tmp_path, reference_run):
    output_dir, _ = reference_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in visible_files(output_dir).items():
        (copy / name).write_bytes(data)
    data_file = sorted(copy.glob("data-*.parquet"))[0]
    data_file.write_bytes(data_file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="differs from the size and hash"):
        capfilt_files(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="has not finished"):
        load_capfilt_output(copy)


def test_webdataset_in_and_out(tmp_path, captioner, random_filter, processor, web):
    """Tar shards in (one output shard per tar), tar shards out, read back by the data layer; beam search makes
    the captions independent of the keys, so they equal a parquet run's over the same images."""
    encoded = web.select(range(4)).cast_column("image", ImageFeature(decode=False))
    samples = ((f"img{row['image_id']:04d}", row["image"]["bytes"], row["caption"], {}) for row in encoded.to_list())
    write_webdataset_shards(samples, tmp_path / "tars", "web", shard_size=2)
    settings = CapFiltSettings(decoding="beam", threshold=THRESHOLD, output_format="webdataset")
    bootstrap(
        webdataset_shards(str(tmp_path / "tars" / "*.tar")), captioner, processor, random_filter, processor,
        tmp_path / "wds", settings, num_workers=0, progress=False,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "wds").glob("data-*")) == ["data-web-00000.tar", "data-web-00001.tar"]
    streamed = list(load_capfilt_output(tmp_path / "wds"))
    parquet_settings = CapFiltSettings(decoding="beam", threshold=THRESHOLD)
    bootstrap(
        dataset_shards(encoded), captioner, processor, random_filter, processor, tmp_path / "pq", parquet_settings,
        num_workers=0, progress=False,
    )  # fmt: skip
    tabled = load_capfilt_output(tmp_path / "pq").to_list()
    assert [(r["caption"], r["source"]) for r in streamed] == [(r["caption"], r["source"]) for r in tabled]
    assert [r["key"] for r in streamed] == [f"img{int(r['key']):04d}" for r in tabled]
    assert streamed[0]["image"]["bytes"] == tabled[0]["image"]["bytes"]


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def test_the_report_shows_samples_histogram_fractions_and_filter_quality(reference_run):
    output_dir, stdout = reference_run
    page = (output_dir / "report" / "index.html").read_text(encoding="utf-8")
    manifest = read_capfilt_manifest(output_dir)
    kept_web, scored_web = manifest["totals"]["texts_kept"]["web"], manifest["totals"]["texts_scored"]["web"]
    assert f"web texts kept: {kept_web} of {scored_web}" in page
    assert re.search(r"precision \d+\.\d%.*recall \d+\.\d%", page)
    assert 'class="kept"' in page and 'class="removed"' in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert "histogram.png" in sources and sum(s.startswith("images/") for s in sources) == 8
    for source in sources:
        with Image.open(output_dir / "report" / source) as image:
            assert image.width > 0
    with Image.open(output_dir / "report" / "report.png") as picture:
        assert picture.height > 600
    quality = json.loads((output_dir / "report" / "summary.json").read_text())["filter_quality"]
    benchmark_web = build_synthetic_benchmark(
        num_human=1, num_web=NUM_WEB, num_val=1, num_test=1, num_vqa=3, num_nlvr=1, image_size=32
    )["web"]
    noisy = dict(zip(map(str, benchmark_web["image_id"]), benchmark_web["is_noisy"]))
    removed = [s["key"] for s in iter_scores(output_dir) if s["source"] == "web" and not s["kept"]]
    assert quality["removed"] == len(removed) and quality["noisy"] == sum(noisy.values())
    assert quality["removed_noisy"] == sum(noisy[key] for key in removed)
    assert "Report:" in stdout
