"""An embedding index of image files for text-to-image and image-to-image search, ITC first and ITM to re-rank.

    index = ImageIndex.build(model, processor, "photos/", "photos.index.safetensors")
    index.search(model, processor, "a red circle", k=5, rerank=True)  # [(path, score), ...], best first

The index is one safetensors file: the normalised ITC feature of every image (`features`, (N, E) float32) and, in
its metadata, the image paths, each file's size and modification time, and a fingerprint of the model and image
size that made the features. Building over an existing index embeds only what it lacks (new images, and images
whose file changed since) and drops images no longer asked for; the file is replaced atomically, so a reader sees
the old index or the new one, never half of one. An index made by another model is refused rather than mixed.

`model` is any BLIP model with ITC features (`BlipForImageTextRetrieval`, `BlipModel`, `BlipForPreTraining`);
re-ranking needs the ITM head (`BlipForImageTextRetrieval`, `BlipForPreTraining`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from .atomic_writes import write_bytes_atomically
from .data.text import pre_caption
from .image_inputs import DecodedImages, ImageFailures, collect_images, decoded_batches, is_container
from .image_processing_blip import decode_image
from .itm_scoring import QUERY_MAX_TOKENS, QUERY_MAX_WORDS, itm_match_probabilities

logger = logging.getLogger(__name__)

INDEX_FORMAT = "blip-image-index/1"

Stamp = tuple[int, int]  # (size in bytes, modification time in ns): a file that changed is embedded again


def _stamp(path: str) -> Stamp | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns


def model_fingerprint(model: Any, processor: Any) -> str:
    """A short digest of what decides an image's feature: the image projection's weights and the image size."""
    digest = hashlib.sha256(model.vision_proj.weight.detach().float().cpu().numpy().tobytes())
    size = processor.image_processor.size
    digest.update(f"{size.height}x{size.width}".encode())
    return digest.hexdigest()[:16]


def _check_itc_model(model: Any, rerank: bool = False) -> None:
    if not hasattr(model, "get_image_features") or not hasattr(model, "vision_proj"):
        raise ValueError(f"{type(model).__name__} has no ITC features: use a retrieval or feature model")
    if rerank and not hasattr(model, "itm_head"):
        raise ValueError(f"{type(model).__name__} has no ITM head to re-rank with: use BlipForImageTextRetrieval")


def _model_place(model: Any) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


class ImageIndex:
    """Normalised ITC features of image files, one row per path; see the module docstring.

    Attributes:
        paths: the indexed image files, in index order.
        features: (N, E) float32, row i the feature of `paths[i]`.
        stamps: each file's (size, modification time) when it was embedded.
        fingerprint: [`model_fingerprint`] of the model that made the features.
        failed: `(path, reason)` of the inputs the last `build` could not index (not saved).
        embedded: how many images the last `build` embedded (the others were reused from the index on disk).
    """

    def __init__(self, paths: Sequence[str], features: torch.Tensor, stamps: Sequence[Stamp], fingerprint: str):
        if len(paths) != features.shape[0] or len(paths) != len(stamps):
            raise ValueError(f"{len(paths)} paths, {features.shape[0]} features and {len(stamps)} stamps differ")
        self.paths = list(paths)
        self.features = features
        self.stamps = [tuple(stamp) for stamp in stamps]
        self.fingerprint = fingerprint
        self.failed: list[tuple[str, str]] = []
        self.embedded = 0

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def load(cls, index_path: str | os.PathLike) -> ImageIndex:
        """The index saved at `index_path`; a ValueError names the file when it is not one."""
        try:
            raw = Path(index_path).read_bytes()
        except OSError as error:
            raise ValueError(f"{index_path}: cannot read the index ({error.strerror or error})") from None
        try:
            tensors = load_safetensors(raw)
            metadata = _read_metadata(raw)
            if metadata.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {metadata.get('format')!r}, not {INDEX_FORMAT!r}")
            return cls(
                json.loads(metadata["paths"]),
                tensors["features"],
                json.loads(metadata["stamps"]),
                metadata["fingerprint"],
            )
        except (SafetensorError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: not an image index of this package ({error})") from None

    def save(self, index_path: str | os.PathLike) -> Path:
        """Writes the index to `index_path` atomically; returns the path."""
        metadata = {
            "format": INDEX_FORMAT,
            "paths": json.dumps(self.paths, ensure_ascii=False),
            "stamps": json.dumps(self.stamps),
            "fingerprint": self.fingerprint,
        }
        return write_bytes_atomically(index_path, save_safetensors({"features": self.features.contiguous()}, metadata))

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        model: Any,
        processor: Any,
        image_paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
        index_path: str | os.PathLike,
        recursive: bool = False,
        batch_size: int = 16,
        num_workers: int = 0,
        progress: bool = False,
    ) -> ImageIndex:
        """Indexes image files (a folder, files, text files listing paths) and saves the index at `index_path`.

        Where `index_path` already holds an index of this model, only the images it lacks, or whose file changed,
        are embedded; images not among the inputs any more are dropped. Inputs that cannot be indexed are listed in
        the returned index's `failed` and left out. Raises ValueError for an index made by another model.
        """
        _check_itc_model(model)
        failures = ImageFailures()
        inputs = (
            [image_paths_or_folder] if isinstance(image_paths_or_folder, (str, os.PathLike)) else image_paths_or_folder
        )
        paths = []
        for path in collect_images(inputs, recursive, failures):
            if is_container(path):
                failures.add(path, "an index holds image files; parquet files and tar shards are not indexed")
            else:
                paths.append(path)
        fingerprint = model_fingerprint(model, processor)
        reused = cls._reusable_rows(index_path, fingerprint, paths)
        features = {path: feature for path, (feature, _) in reused.items()}
        todo = [path for path in paths if path not in features]
        device, dtype = _model_place(model)
        was_training = model.training
        model.eval()
        bar = tqdm(total=len(todo), unit="img", desc="Indexing", disable=not progress)
        try:
            dataset = DecodedImages(todo, [processor.image_processor])
            for names, (pixel_values,) in decoded_batches(dataset, batch_size, num_workers, failures):
                batch = model.get_image_features(pixel_values.to(device=device, dtype=dtype)).float().cpu()
                features.update(zip(names, batch))
                bar.update(len(names))
        finally:
            bar.close()
            model.train(was_training)
        kept = [path for path in paths if path in features]
        index = cls(
            kept,
            torch.stack([features[path] for path in kept]) if kept else torch.empty(0, model.vision_proj.out_features),
            [reused[path][1] if path in reused else _stamp(path) for path in kept],
            fingerprint,
        )
        index.failed = failures.failed
        index.embedded = len(kept) - sum(path in reused for path in kept)
        index.save(index_path)
        return index

    @classmethod
    def _reusable_rows(cls, index_path: str | os.PathLike, fingerprint: str, paths: Sequence[str]) -> dict:
        """`{path: (feature, stamp)}` of the saved rows still valid for `paths`: same model, file unchanged."""
        if not Path(index_path).exists():
            return {}
        saved = cls.load(index_path)
        if saved.fingerprint != fingerprint:
            raise ValueError(
                f"{index_path}: this index was built by another model (or image size); "
                "give a new index path or delete this one"
            )
        wanted = set(paths)
        return {
            path: (feature, stamp)
            for path, feature, stamp in zip(saved.paths, saved.features, saved.stamps)
            if path in wanted and _stamp(path) == stamp
        }

    @torch.inference_mode()
    def search(
        self, model: Any, processor: Any, text: str, k: int = 10, rerank: bool = False
    ) -> list[tuple[str, float]]:
        """The `k` images that best match `text`, best first, as `(path, score)`.

        Without `rerank` the score is the ITC cosine similarity; with it the top `k` by ITC are scored again by
        the ITM head and the score is its match probability (softmax over the ITM logits). An image that cannot
        be read any more is left out of a re-ranked list, with a warning.
        """
        _check_itc_model(model, rerank)
        self._check_model(model, processor)
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        if not self.paths:
            return []
        device, _ = _model_place(model)
        tokens = _query_tokens(processor, [text], device)
        was_training = model.training
        model.eval()
        try:
            query = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).float().cpu()[0]
            top = self._top(query, k)
            return self._itm_reranked(model, processor, text, top) if rerank else top
        finally:
            model.train(was_training)

    @torch.inference_mode()
    def search_image(self, model: Any, processor: Any, image: Any, k: int = 10) -> list[tuple[str, float]]:
        """The `k` indexed images most like `image` (a path, bytes or PIL image) by ITC cosine similarity."""
        _check_itc_model(model)
        self._check_model(model, processor)
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}")
        device, dtype = _model_place(model)
        pixel_values = processor.image_processor(images=decode_image(image), return_tensors="pt")["pixel_values"]
        was_training = model.training
        model.eval()
        try:
            query = model.get_image_features(pixel_values.to(device=device, dtype=dtype)).float().cpu()[0]
        finally:
            model.train(was_training)
        return self._top(query, k) if self.paths else []

    def _check_model(self, model: Any, processor: Any) -> None:
        if model_fingerprint(model, processor) != self.fingerprint:
            raise ValueError("this index was built by another model (or image size) than the one searching it")

    def _top(self, query: torch.Tensor, k: int) -> list[tuple[str, float]]:
        scores, rows = (self.features @ query).topk(min(k, len(self.paths)))
        return [(self.paths[row], float(score)) for row, score in zip(rows.tolist(), scores)]

    def _itm_reranked(self, model: Any, processor: Any, text: str, top: list[tuple[str, float]]) -> list:
        readable, pixels = [], []
        for path, _ in top:
            try:
                image = decode_image(path)
            except (ValueError, OSError) as error:
                logger.warning(f"{path}: left out of the re-ranked list ({error})")
                continue
            readable.append(path)
            pixels.append(processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0])
        if not readable:
            return []
        match = itm_match_probabilities(model, processor, torch.stack(pixels), [text] * len(readable))
        order = match.argsort(descending=True).tolist()
        return [(readable[row], float(match[row])) for row in order]


def _query_tokens(processor: Any, texts: Sequence[str], device: torch.device) -> Any:
    """Texts cleaned and tokenized as BLIP's retrieval recipe does (30 words, 35 tokens)."""
    cleaned = [pre_caption(text, QUERY_MAX_WORDS) for text in texts]
    tokens = processor.tokenizer(
        cleaned, padding="longest", truncation=True, max_length=QUERY_MAX_TOKENS, return_tensors="pt"
    )
    return tokens.to(device)


def _read_metadata(raw: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (the 8-byte length, then the JSON header)."""
    header_length = int.from_bytes(raw[:8], "little")
    if header_length > len(raw) - 8:
        raise ValueError("its header is longer than the file")
    return json.loads(raw[8 : 8 + header_length]).get("__metadata__") or {}


__all__ = ["INDEX_FORMAT", "ImageIndex", "model_fingerprint"]
