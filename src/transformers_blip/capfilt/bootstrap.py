"""CapFilt: caption a web dataset with a captioner, score every text with a filter, keep what matches.

For each web image the captioner (a `BlipForConditionalGeneration`) writes `num_captions` synthetic captions; the
filter (a `BlipForImageTextRetrieval`) scores the web caption and each synthetic one (ITM match probability and ITC
similarity); a text whose match probability is below the threshold is dropped. What is kept is written as one record
per (image, text) pair, ready for pretraining.

The work is split into input shards (a range of rows of a dataset, or one webdataset tar) and each shard is one
unit: it is read, its images decoded in DataLoader workers, captioned and scored in batches, and its output committed
atomically (see `data/bootstrapped.py` for the layout). A restarted run skips the shards already committed and redoes
the others whole, so a run killed at any point ends, when started again, with the very bytes of an uninterrupted run.
Under `torchrun` / `accelerate launch` shard `i` belongs to rank `i % world_size`.

Sampling does not use the global random state: each (image, caption number) draws from its own generator, seeded
from the global seed and the image's key (`caption_seed`), through Gumbel noise added to the filtered logits before
an argmax, which samples exactly from the top-k / top-p distribution. A caption therefore does not depend on the batch
it was generated in, the shard, the rank, or where a run was interrupted.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from datasets import Dataset
from datasets import Image as ImageFeature
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from ..atomic_writes import PARTIAL_MARK, atomic_file, write_text_atomically
from ..data.annotations import clean_caption, stable_id
from ..data.bootstrapped import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, capfilt_files, file_digest
from ..data.decoding import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, load_image
from ..data.skips import BadSampleError, SkippedSample, SkipReport
from ..data.streaming import expand_shards, load_webdataset
from ..data.text import MAX_WORDS, pre_caption
from ..itm_scoring import score_texts
from ..losses import rank_and_world_size
from ..processing_blip import decode_captions

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("parquet", "webdataset")
SETTINGS_NAME = "capfilt_settings.json"
_KEY_COLUMNS = ("key", "image_id")  # the image key, first found; else the image's path


# ---------------------------------------------------------------------------------------------------------------
# Settings and input shards
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CapFiltSettings:
    """How to bootstrap. Everything here shapes the output; batch sizes and workers do not, and are not here.

    Args:
        num_captions: synthetic captions per image (the paper writes one).
        decoding: `"nucleus"` (the paper's sampling) or `"beam"` (deterministic beam search, `num_beams` beams).
        top_p, top_k, repetition_penalty: nucleus sampling as the original samples (top-p 0.9, repetition penalty
            1.1; its transformers 4.15 also applied the default top-k of 50).
        num_beams: beams for `decoding="beam"`, at least `num_captions`.
        min_length, max_length: tokens of `[DEC]`, the prompt and the caption (the original's 10 and 30).
        prompt: the captioner's prompt; `None` takes its config's (`"a picture of "`), `""` none.
        threshold: a text whose ITM match probability is below it is dropped (0.5: "predicted unmatched").
        seed: the global seed the per-image sampling seeds derive from.
        max_text_length: tokens of a text scored by the filter (padded to it, so a score does not depend on the
            batch's other texts).
        max_words: words kept by `pre_caption` for web and synthetic captions.
        output_format: `"parquet"` or `"webdataset"` data files (the scores are parquet either way).
    """

    num_captions: int = 1
    decoding: str = "nucleus"
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    num_beams: int = 3
    min_length: int = 10
    max_length: int = 30
    prompt: str | None = None
    threshold: float = 0.5
    seed: int = 0
    max_text_length: int = 35
    max_words: int = MAX_WORDS["pretrain"]
    output_format: str = "parquet"

    def __post_init__(self) -> None:
        if self.num_captions < 0:
            raise ValueError(f"num_captions must be >= 0, got {self.num_captions}")
        if self.decoding not in ("nucleus", "beam"):
            raise ValueError(f"decoding must be 'nucleus' or 'beam', got {self.decoding!r}")
        if self.decoding == "beam" and self.num_beams < self.num_captions:
            raise ValueError(f"beam search returns at most num_beams ({self.num_beams}) captions per image")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")


@dataclass(frozen=True)
class InputShard:
    """One unit of work: a name (its output files are named after it) and how to read its rows.

    A row holds `image` (a `datasets.Image(decode=False)` value, a path or bytes), `caption` (the web text) and
    the image's `key`.
    """

    name: str
    dataset: Dataset | None = None  # rows of a map-style dataset...
    first_row: int = 0  # ...the first of which is this row of the whole input,
    tar_path: str | None = None  # or one webdataset shard

    def rows(self, report: SkipReport) -> list[dict[str, Any]]:
        """The shard's rows, each with its `key`; what a webdataset shard loses as it is read goes to `report`."""
        if self.dataset is not None:
            return [_with_key(row, f"row{self.first_row + index}") for index, row in enumerate(self.dataset)]
        stream = load_webdataset([self.tar_path], report=report)
        return [_with_key(row, row["key"]) for row in stream]


def _image_path(row: dict[str, Any]) -> str | None:
    image = row.get("image")
    return image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None


def _with_key(row: dict[str, Any], fallback: str) -> dict[str, Any]:
    """The row with a string `key`: its `key` or `image_id` column, else its image path, else `fallback` (its row
    number in the whole input: the seeds then follow the input's order, still not the sharding)."""
    for name in _KEY_COLUMNS:
        if row.get(name) is not None:
            return {**row, "key": str(row[name])}
    return {**row, "key": _image_path(row) or fallback}


def dataset_shards(dataset: Dataset, shard_size: int = 1000) -> list[InputShard]:
    """A dataset (web split, parquet, caption JSON, image folder, as the loaders give them) cut into shards of
    `shard_size` consecutive rows, named `00000`, `00001`, ...; images stay encoded until a worker decodes them."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    for name, feature in dataset.features.items():
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
    starts = range(0, len(dataset), shard_size)
    return [
        InputShard(
            f"{number:05d}",
            dataset=dataset.select(range(start, min(start + shard_size, len(dataset)))),
            first_row=start,
        )
        for number, start in enumerate(starts)
    ]


def webdataset_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[InputShard]:
    """One input shard per tar (paths, globs or brace ranges), named after the tar's file name."""
    paths = expand_shards(shards)
    if not paths:
        raise FileNotFoundError(f"no shards match {shards!r}")
    names = [Path(path).name.removesuffix(".tar") for path in paths]
    if len(set(names)) != len(names):
        raise ValueError("webdataset shards in different folders share a file name; their outputs would collide")
    return [InputShard(name, tar_path=os.fspath(path)) for name, path in zip(names, paths)]


# ---------------------------------------------------------------------------------------------------------------
# Decoding in DataLoader workers
# ---------------------------------------------------------------------------------------------------------------


def _encoded_image(value: Any, source: str) -> tuple[bytes, str | None]:
    """(the image's encoded bytes, its path) from a `datasets.Image` value, a path or bytes."""
    path = None
    if isinstance(value, dict):
        value, path = value.get("bytes") or value.get("path"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), path
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as handle:
                return handle.read(), os.fspath(value)
        except FileNotFoundError as error:
            raise BadSampleError(source, "missing_file", str(error)) from error
        except OSError as error:
            raise BadSampleError(source, "unreadable_image", str(error)) from error
    raise BadSampleError(source, "missing_field", f"no image bytes or path (got {type(value).__name__})")


class _ShardImages(torch.utils.data.Dataset):
    """A shard's images decoded (with the data layer's limits) and turned into each model's pixels, in workers."""

    def __init__(self, rows: list[dict], image_processors: dict[str, Any], max_pixels: int, min_side: int):
        self.rows = rows
        self.image_processors = image_processors
        self.max_pixels = max_pixels
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        source = _source_of(row)
        try:
            encoded, path = _encoded_image(row.get("image"), source)
            image = load_image(encoded, self.max_pixels, self.min_side, name=source)
        except BadSampleError as error:
            return {"position": position, "skipped": SkippedSample(error.source, error.reason or "unknown")}
        pixels = {
            name: processor(images=image, return_tensors="pt")["pixel_values"][0]
            for name, processor in self.image_processors.items()
        }
        return {"position": position, "pixels": pixels, "image": {"bytes": encoded, "path": path}}


def _source_of(row: dict[str, Any]) -> str:
    """How skips name a row: its image's path, else its key."""
    return _image_path(row) or row["key"]


def _stacked(items: list[dict], model: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The pixels of decoded items for `model` (`"captioner"` or `"filter"`), (B, 3, H, W)."""
    return torch.stack([item["pixels"][model] for item in items]).to(device=device, dtype=dtype)


def _as_list(items: list) -> list:
    return items  # batches stay lists: the main process splits decoded images from skipped ones


# ---------------------------------------------------------------------------------------------------------------
# Captioning and scoring
# ---------------------------------------------------------------------------------------------------------------


def caption_seed(seed: int, key: str, caption_index: int) -> int:
    """The sampling seed of an image's `caption_index`-th caption: a 63-bit hash of the global seed and the key."""
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{caption_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class GumbelSampling(LogitsProcessor):
    """Adds Gumbel noise from one generator per row, so that the argmax (greedy search) is a sample of the softmax
    of the (already filtered) logits, each row's draws its own whatever batch it is in.

    The generators live on the logits' device (seeded from `seeds` at the first step), so a GPU run draws there
    instead of copying the noise over at every step; a CPU run and a GPU run therefore sample differently.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device, vocab_size = scores.device, scores.shape[-1]
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in self.seeds]
        uniform = torch.stack(
            [torch.rand(vocab_size, generator=g, dtype=torch.float64, device=device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-300, 1.0)))  # (R, V)
        return scores.float() + gumbel.float()


def _prompt_ids(tokenizer: Any, prompt: str, batch_size: int, device: torch.device) -> torch.Tensor | None:
    if not prompt:
        return None
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, P): [CLS] prompt [SEP]
    return ids.expand(batch_size, -1).to(device)


@torch.inference_mode()
def generate_captions(
    captioner: Any, tokenizer: Any, pixel_values: torch.Tensor, keys: Sequence[str], settings: CapFiltSettings
) -> list[list[str]]:
    """`settings.num_captions` captions for each image, prompt stripped (nucleus: seeded per key; or beam search)."""
    count = settings.num_captions
    if count == 0:
        return [[] for _ in keys]
    prompt = captioner.config.prompt if settings.prompt is None else settings.prompt
    lengths = {"min_length": settings.min_length, "max_length": settings.max_length}
    if settings.decoding == "beam":
        generated = captioner.generate(
            pixel_values,
            input_ids=_prompt_ids(tokenizer, prompt, len(keys), pixel_values.device),
            num_beams=settings.num_beams,
            num_return_sequences=count,
            do_sample=False,
            **lengths,
        )
    else:
        # Each image's cross-attention keys/values once, read by its `count` rows (grouped consecutively).
        image_embeds = captioner.vision_model(pixel_values).last_hidden_state
        image_key_values = captioner.text_decoder.bert.image_key_values(image_embeds)
        prompt_ids = _prompt_ids(tokenizer, prompt, len(keys) * count, pixel_values.device)
        input_ids, attention_mask = captioner._decoder_prompt(len(keys) * count, prompt_ids, None, image_embeds.device)
        seeds = [caption_seed(settings.seed, key, index) for key in keys for index in range(count)]
        processors = [TopPLogitsWarper(settings.top_p)]
        if settings.top_k:
            processors.insert(0, TopKLogitsWarper(settings.top_k))
        # Greedy search over the noised logits: the argmax is the sample (see `GumbelSampling`).
        generation_config = copy.deepcopy(captioner.generation_config)
        generation_config.update(
            do_sample=False, num_beams=1, repetition_penalty=settings.repetition_penalty, **lengths
        )
        generated = captioner.text_decoder.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_key_values=image_key_values,
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([*processors, GumbelSampling(seeds)]),
        )
    captions = decode_captions(tokenizer, generated, prompt=prompt or None)
    return [captions[index * count : (index + 1) * count] for index in range(len(keys))]


# ---------------------------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ShardResult:
    """What a shard gave: kept records (with images), every scored text (without), the counts and the skips."""

    records: list[dict[str, Any]] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[SkippedSample] = field(default_factory=list)
    images: int = 0


def _texts_of_image(row: dict[str, Any], synthetic: list[str], max_words: int) -> list[tuple[str, str]]:
    """(source, text) pairs to score: the web caption first, then the synthetic ones, each cleaned."""
    return [("web", row["caption"])] + [("synthetic", pre_caption(text, max_words)) for text in synthetic]


def _image_records(
    row: dict[str, Any],
    image: dict,
    texts: list[tuple[str, str]],
    itm: list[float],
    itc: list[float],
    threshold: float,
) -> tuple[list[dict], list[dict]]:
    kept = [i for i, ((_, text), p) in enumerate(zip(texts, itm)) if text and p >= threshold]
    key = row["key"]
    scores = [
        {"key": key, "source": source, "text": text, "itm_score": itm[i], "itc_similarity": itc[i], "kept": i in kept}
        for i, (source, text) in enumerate(texts)
    ]
    records = [
        {
            "image": image,
            "caption": texts[i][1],
            "source": texts[i][0],
            "itm_score": itm[i],
            "itc_similarity": itc[i],
            "key": key,
            "image_id": stable_id(key),
            "image_texts_scored": len(texts),
            "image_texts_kept": len(kept),
        }
        for i in kept
    ]
    return records, scores


def process_shard(
    shard: InputShard,
    captioner: Any,
    captioner_processor: Any,
    filter_model: Any,
    filter_processor: Any,
    settings: CapFiltSettings,
    batch_size: int = 16,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    report: SkipReport | None = None,
    on_batch: Any = None,
) -> ShardResult:
    """Caption and score one shard. Rows whose caption is empty or whose image does not decode are skipped and
    listed in the result (never fatal); `on_batch(images, kept, scored)` is called after each batch."""
    report = report if report is not None else SkipReport()
    result = ShardResult()
    rows = []
    for row in shard.rows(report):
        try:
            rows.append({**row, "caption": clean_caption(row.get("caption"), _source_of(row), settings.max_words)})
        except BadSampleError as error:
            result.skipped.append(SkippedSample(error.source, error.reason or "unknown", error.detail))
    processors = {"captioner": captioner_processor.image_processor, "filter": filter_processor.image_processor}
    loader = DataLoader(
        _ShardImages(rows, processors, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_as_list,
    )
    for items in loader:
        result.skipped += [item["skipped"] for item in items if "skipped" in item]
        good = [item for item in items if "skipped" not in item]
        if not good:
            continue
        batch_rows = [rows[item["position"]] for item in good]
        keys = [row["key"] for row in batch_rows]
        synthetic = generate_captions(
            captioner, captioner_processor.tokenizer, _stacked(good, "captioner", device, dtype), keys, settings
        )
        texts = [_texts_of_image(row, own, settings.max_words) for row, own in zip(batch_rows, synthetic)]
        itm, itc = score_texts(
            filter_model,
            filter_processor.tokenizer,
            _stacked(good, "filter", device, dtype),
            [[text for _, text in own] for own in texts],
            settings.max_text_length,
        )
        batch_records = 0
        for index, (row, item) in enumerate(zip(batch_rows, good)):
            records, scores = _image_records(
                row, item["image"], texts[index], itm[index].tolist(), itc[index].tolist(), settings.threshold
            )
            result.records += records
            result.scores += scores
            batch_records += len(records)
        result.images += len(good)
        if on_batch is not None:
            on_batch(len(items), batch_records, sum(len(own) for own in texts))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Writing a shard, the manifest, resuming
# ---------------------------------------------------------------------------------------------------------------

_RECORD_SCHEMA = pa.schema(
    [
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("itm_score", pa.float32()),
        ("itc_similarity", pa.float32()),
        ("key", pa.string()),
        ("image_id", pa.int64()),
        ("image_texts_scored", pa.int32()),
        ("image_texts_kept", pa.int32()),
    ]
)
_SCORE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("text", pa.string()),
        ("itm_score", pa.float32()),
        ("itc_similarity", pa.float32()),
        ("kept", pa.bool_()),
    ]
)
# The webdataset `.json` member of a record: every column but the image and the caption.
WEBDATASET_METADATA = [name for name in _RECORD_SCHEMA.names if name not in ("image", "caption")]


def _write_parquet(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_file(path) as handle:
        pq.write_table(table, handle, compression="zstd")


def _image_extension(data: bytes) -> str:
    signatures = {b"\x89PNG": "png", b"\xff\xd8\xff": "jpg", b"RIFF": "webp", b"GIF8": "gif", b"BM": "bmp"}
    return next((ext for magic, ext in signatures.items() if data.startswith(magic)), "img")


def _write_webdataset(path: Path, records: list[dict]) -> None:
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0  # no clock in the bytes: a rerun writes the same tar
        tar.addfile(info, io.BytesIO(data))

    with atomic_file(path) as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for number, record in enumerate(records):
            member = f"{number:08d}"  # one sample per kept text; the image key is in the metadata
            image = record["image"]["bytes"]
            add(tar, f"{member}.{_image_extension(image)}", image)
            add(tar, f"{member}.txt", record["caption"].encode("utf-8"))
            metadata = {name: record[name] for name in WEBDATASET_METADATA}
            add(tar, f"{member}.json", json.dumps(metadata, sort_keys=True).encode("utf-8"))


def _shard_marker_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"shard-{name}.json"


def _data_file_name(name: str, output_format: str) -> str:
    return f"data-{name}.{'tar' if output_format == 'webdataset' else 'parquet'}"


def commit_shard(output_dir: Path, name: str, result: ShardResult, settings: CapFiltSettings) -> dict[str, Any]:
    """Write the shard's data and scores files, then its marker (which makes it done); returns the marker."""
    data_file, scores_file = _data_file_name(name, settings.output_format), f"scores-{name}.parquet"
    if settings.output_format == "webdataset":
        _write_webdataset(output_dir / data_file, result.records)
    else:
        _write_parquet(output_dir / data_file, result.records, _RECORD_SCHEMA)
    _write_parquet(output_dir / scores_file, result.scores, _SCORE_SCHEMA)
    kept = [score for score in result.scores if score["kept"]]
    marker = {
        "shard": name,
        "data_file": data_file,
        "scores_file": scores_file,
        "files": {file: file_digest(output_dir / file) for file in (data_file, scores_file)},
        "images": result.images,
        "records": len(result.records),
        "texts_scored": _by_source(result.scores),
        "texts_kept": _by_source(kept),
        "skipped": [asdict(entry) for entry in result.skipped],
    }
    write_text_atomically(_shard_marker_path(output_dir, name), json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def _by_source(scores: list[dict]) -> dict[str, int]:
    return {source: sum(score["source"] == source for score in scores) for source in ("web", "synthetic")}


def finished_marker(output_dir: Path, name: str) -> dict[str, Any] | None:
    """The marker of a shard whose files are whole and match it, else None (the shard must be done again)."""
    path = _shard_marker_path(output_dir, name)
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        if all(file_digest(output_dir / file) == digest for file, digest in marker["files"].items()):
            return marker
    except (OSError, ValueError, KeyError):
        pass
    return None


def remove_stale_partials(output_dir: Path, name: str, output_format: str) -> None:
    """Delete the temporary files a killed run left for shard `name` (only its own rank ever writes them)."""
    for file in (
        _data_file_name(name, output_format),
        f"scores-{name}.parquet",
        _shard_marker_path(output_dir, name).name,
    ):
        for stale in output_dir.glob(f".{file}{PARTIAL_MARK}*"):
            stale.unlink(missing_ok=True)


def _settings_record(settings: CapFiltSettings, models: dict[str, str]) -> dict[str, Any]:
    return {**asdict(settings), **models}


def _check_or_write_settings(output_dir: Path, record: dict[str, Any], is_main: bool) -> None:
    """A directory holds one run: a restart with other settings would mix two runs' shards, so it is refused."""
    path = output_dir / SETTINGS_NAME
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != record:
            changed = sorted(name for name in {*stored, *record} if stored.get(name) != record.get(name))
            raise ValueError(
                f"{output_dir} holds a CapFilt run with other settings ({', '.join(changed)} differ); give another "
                "--output_dir or the same settings to resume it"
            )
    elif is_main:
        write_text_atomically(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def write_manifest(output_dir: Path, markers: list[dict[str, Any]], settings_record: dict[str, Any]) -> Path:
    """The manifest of a finished run: settings, every shard's marker in input order, totals."""
    totals = {
        "images": sum(marker["images"] for marker in markers),
        "records": sum(marker["records"] for marker in markers),
        "skipped": sum(len(marker["skipped"]) for marker in markers),
        "texts_scored": {s: sum(m["texts_scored"][s] for m in markers) for s in ("web", "synthetic")},
        "texts_kept": {s: sum(m["texts_kept"][s] for m in markers) for s in ("web", "synthetic")},
    }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "settings": settings_record,
        "metadata_fields": WEBDATASET_METADATA,
        "totals": totals,
        "shards": markers,
    }
    return write_text_atomically(output_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CapFiltSummary:
    """What a run (or a rank of it) did: images, texts scored and kept per source, skips, shards, speed."""

    images: int = 0
    records: int = 0
    texts_scored: dict[str, int] = field(default_factory=lambda: {"web": 0, "synthetic": 0})
    texts_kept: dict[str, int] = field(default_factory=lambda: {"web": 0, "synthetic": 0})
    skipped: list[dict[str, str]] = field(default_factory=list)
    shards_done: int = 0
    shards_resumed: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    manifest: str | None = None

    def kept_fraction(self, source: str | None = None) -> float:
        """Share of the scored texts (of `source`, or all) that were kept."""
        sources = [source] if source else ["web", "synthetic"]
        scored = sum(self.texts_scored[s] for s in sources)
        return sum(self.texts_kept[s] for s in sources) / scored if scored else 0.0

    def add(self, marker: dict[str, Any]) -> None:
        self.images += marker["images"]
        self.records += marker["records"]
        self.skipped += marker["skipped"]
        for source in ("web", "synthetic"):
            self.texts_scored[source] += marker["texts_scored"][source]
            self.texts_kept[source] += marker["texts_kept"][source]

    def text(self) -> str:
        reasons: dict[str, int] = {}
        for entry in self.skipped:
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items())) or "none"
        return (
            f"CapFilt: {self.images} images, {self.records} records kept; web kept {self.kept_fraction('web'):.1%}"
            f" of {self.texts_scored['web']}, synthetic kept {self.kept_fraction('synthetic'):.1%} of"
            f" {self.texts_scored['synthetic']}; skipped: {skipped}; {self.shards_done} shards done here"
            f" ({self.shards_resumed} already committed), {self.images_per_second:.2f} images/s"
        )


def bootstrap(
    shards: Sequence[InputShard],
    captioner: Any,
    captioner_processor: Any,
    filter_model: Any,
    filter_processor: Any,
    output_dir: str | os.PathLike,
    settings: CapFiltSettings | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    model_names: dict[str, str] | None = None,
    report: SkipReport | None = None,
    progress: bool = True,
) -> CapFiltSummary:
    """Run CapFilt over `shards`, writing into `output_dir`; resumes a run there with the same settings.

    Under a process group each rank does shards `rank, rank + world_size, ...`; the main rank writes the manifest
    once every rank is done (the ranks meet at a barrier). Without one, the manifest is written when every shard is.

    Args:
        captioner, captioner_processor: a `BlipForConditionalGeneration` and its processor.
        filter_model, filter_processor: a `BlipForImageTextRetrieval` and its processor.
        model_names: how the models were named (paths, hub ids), recorded in the settings of the run.
        report: where the rows a webdataset shard loses as it is read are counted (the decode and caption skips of
            each shard are in its marker and the manifest).

    Returns:
        This process's `CapFiltSummary`; `manifest` is the manifest's path where this process wrote it.
    """
    settings = settings if settings is not None else CapFiltSettings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shard names must be distinct: each names its output files")
    rank, world_size = rank_and_world_size()
    record = _settings_record(settings, model_names or {})
    _check_or_write_settings(output_dir, record, is_main=rank == 0)
    for model in (captioner, filter_model):  # moved and cast in place
        model.to(device=device, dtype=dtype).eval()

    summary = CapFiltSummary()
    mine = [shard for index, shard in enumerate(shards) if index % world_size == rank]
    todo = []
    for shard in mine:
        marker = finished_marker(output_dir, shard.name)
        if marker is None:
            todo.append(shard)
        else:
            summary.shards_resumed += 1
    # Rows to go, where the shards know theirs (a webdataset shard is counted as it is read).
    total = sum(len(shard.dataset) for shard in todo) if all(s.dataset is not None for s in todo) else None
    description = f"CapFilt (rank {rank})" if world_size > 1 else "CapFilt"
    bar = tqdm(total=total, desc=description, unit="img", disable=not progress)
    counts = {"kept": 0, "scored": 0}

    def on_batch(images: int, kept: int, scored: int) -> None:
        counts["kept"] += kept
        counts["scored"] += scored
        bar.update(images)
        bar.set_postfix(kept=f"{counts['kept'] / max(counts['scored'], 1):.1%}")

    start = time.perf_counter()
    try:
        for shard in todo:
            remove_stale_partials(output_dir, shard.name, settings.output_format)
            result = process_shard(
                shard, captioner, captioner_processor, filter_model, filter_processor, settings,
                batch_size, num_workers, device, dtype, report, on_batch,
            )  # fmt: skip
            summary.add(commit_shard(output_dir, shard.name, result, settings))
            summary.shards_done += 1
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.images_per_second = summary.images / summary.seconds if summary.seconds > 0 else 0.0

    if world_size > 1:
        dist.barrier()
    if rank == 0:
        markers = [finished_marker(output_dir, name) for name in names]
        missing = [name for name, marker in zip(names, markers) if marker is None]
        if missing:
            raise RuntimeError(f"shards {missing[:5]} of {output_dir} were not committed; run again to finish them")
        summary.manifest = os.fspath(write_manifest(output_dir, markers, record))
    if world_size > 1:
        dist.barrier()
    logger.info(summary.text())
    return summary


def iter_scores(output_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Every scored text of a finished run (key, source, text, itm_score, itc_similarity, kept), in input order."""
    for path in capfilt_files(output_dir, "scores"):
        yield from pq.read_table(path).to_pylist()


__all__ = [
    "OUTPUT_FORMATS",
    "CapFiltSettings",
    "CapFiltSummary",
    "GumbelSampling",
    "InputShard",
    "ShardResult",
    "bootstrap",
    "caption_seed",
    "commit_shard",
    "dataset_shards",
    "finished_marker",
    "generate_captions",
    "iter_scores",
    "process_shard",
    "webdataset_shards",
    "write_manifest",
]
