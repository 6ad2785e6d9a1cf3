"""Captioning many images: gather the inputs, decode them in DataLoader workers, caption in batches, write results
that survive an interruption.

The inputs are those of [`image_inputs.collect_images`]: image files, folders, lists of paths, parquet files and
webdataset tar shards. The output is a JSON-lines file (one `{"image", "caption"}` per image, plus `itm_score` when a
retrieval model scores the captions) and/or a sidecar text file beside each image file.
Both are safe to interrupt, even by SIGKILL: the JSON-lines file is appended to and synced after every batch, and a
restarted run first cuts off a last line that was only half written, then skips the images already in the file;
a sidecar is written under a temporary name and renamed into place, so it is whole or absent. Bad inputs (a path
that does not exist, a folder without images, a file that is not an image) are reported one line each and counted;
they never stop the run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .atomic_writes import write_text_atomically
from .image_inputs import DecodedImages, ImageFailures, collect_images, count_images, decoded_batches, is_container
from .image_processing_blip import DEFAULT_MAX_PIXELS
from .itm_scoring import itm_match_probabilities

logger = logging.getLogger(__name__)


@dataclass
class CaptionRun(ImageFailures):
    """What a run did: captioned, skipped as already done, and the inputs that failed, each with its reason."""

    captioned: int = 0
    already_done: int = 0

    def summary(self) -> str:
        text = f"captioned {self.captioned} image(s)"
        if self.already_done:
            text += f", {self.already_done} already done"
        if self.failed:
            text += f", {len(self.failed)} failed"
        return text


def read_done(output: Path) -> set[str]:
    """The images already in a JSON-lines output, after cutting off a last line that was only half written."""
    if not output.exists():
        return set()
    done, good_length = set(), 0
    with open(output, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                break
            try:
                done.add(json.loads(line)["image"])
            except (ValueError, KeyError, TypeError):
                break
            good_length += len(line)
    if good_length != output.stat().st_size:
        logger.warning(f"{output}: removing a last line that was not complete (an interrupted run)")
        with open(output, "r+b") as file:
            file.truncate(good_length)
            os.fsync(file.fileno())
    return done


def write_sidecar(image_path: str, suffix: str, text: str) -> None:
    """`text` beside the image (`photo.jpg` -> `photo.txt`), whole or not at all."""
    write_text_atomically(Path(image_path).with_suffix(suffix), text + "\n")


@dataclass
class CaptionSettings:
    """How to caption: decoding options (transformers' generate arguments) and the prompt."""

    prompt: str = ""
    num_beams: int = 3
    do_sample: bool = False
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    min_length: int = 5
    max_length: int = 20
    num_captions: int = 1
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "min_length": self.min_length,
            "max_length": self.max_length,
            "num_return_sequences": self.num_captions,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            return {**kwargs, "do_sample": True, "top_p": self.top_p, "num_beams": 1}
        return {**kwargs, "do_sample": False, "num_beams": max(self.num_beams, self.num_captions)}


def _already_done(paths: Sequence[str], done: set[str]) -> int:
    """How many images of `paths` (files, and the rows or samples of containers) `done` names."""
    files = {path for path in paths if not is_container(path)}
    containers = tuple(str(path) + separator for path in paths if is_container(path) for separator in (":", "/"))
    return sum(name in files or name.startswith(containers) for name in done)


@torch.inference_mode()
def caption_images(
    model: Any,
    processor: Any,
    paths: Sequence[str],
    settings: CaptionSettings,
    output: str | os.PathLike | None = None,
    sidecar: str | None = None,
    skip_existing: bool = False,
    batch_size: int = 8,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    run: CaptionRun | None = None,
    progress: bool = True,
    scorer: tuple[Any, Any] | None = None,
    image_column: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> CaptionRun:
    """Caption `paths` with `model` (a `BlipForConditionalGeneration`) and `processor`, writing as it goes.

    Args:
        paths: image files, parquet files and tar shards (see [`image_inputs.collect_images`]).
        output: a JSON-lines file, appended to; the images it already holds are skipped (resume).
        sidecar: a suffix such as `".txt"`: write each caption beside its image file (not for parquet rows or tar
            samples, which have no file to sit beside).
        skip_existing: skip images whose sidecar exists already.
        scorer: `(model, processor)` of a retrieval model: each caption's ITM match probability goes into the
            JSON-lines record as `itm_score` (`itm_scores` with several captions), on the same device and dtype.
        image_column: the column of parquet files that holds the images.
        max_pixels: images with more pixels are refused (a decompression bomb costs nothing).
    """
    run = run if run is not None else CaptionRun()
    if output is None and sidecar is None:
        raise ValueError("nowhere to write the captions: give an output file, a sidecar suffix, or both")
    if output is None and any(is_container(path) for path in paths):
        raise ValueError("parquet files and tar shards have no file to put a sidecar beside: give an output file")
    output = Path(output) if output is not None else None
    done = read_done(output) if output is not None else set()
    if skip_existing and sidecar is not None:
        done |= {path for path in paths if not is_container(path) and Path(path).with_suffix(sidecar).exists()}
    run.already_done += _already_done(paths, done)
    todo = [path for path in paths if is_container(path) or path not in done]
    model.to(device=device, dtype=dtype).eval()
    image_processors = [processor.image_processor]
    if scorer is not None:
        scorer[0].to(device=device, dtype=dtype).eval()
        image_processors.append(scorer[1].image_processor)
    prompt_inputs = processor.tokenizer(settings.prompt, return_tensors="pt") if settings.prompt else None
    images = DecodedImages(todo, image_processors, skip=done, image_column=image_column, max_pixels=max_pixels)
    total = count_images(todo)
    files = {path for path in todo if not is_container(path)}
    writer = open(output, "a", encoding="utf-8") if output is not None else None
    total = None if total is None else total - _already_done(todo, done)
    bar = tqdm(total=total, unit="img", desc="Captioning", disable=not progress)
    try:
        for names, pixel_values in decoded_batches(images, batch_size, num_workers, run):
            captions = _caption_batch(model, processor, pixel_values[0], prompt_inputs, settings, device, dtype)
            scores = None
            if scorer is not None:
                scores = itm_match_probabilities(scorer[0], scorer[1], pixel_values[1], captions).tolist()
            _write(names, captions, scores, settings.num_captions, writer, sidecar, files)
            run.captioned += len(names)
            bar.update(len(names))
            bar.set_postfix(failed=len(run.failed))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return run


def _caption_batch(model, processor, pixel_values, prompt_inputs, settings, device, dtype) -> list[str]:
    inputs = {"pixel_values": pixel_values.to(device=device, dtype=dtype)}
    if prompt_inputs is not None:
        inputs["input_ids"] = prompt_inputs["input_ids"].expand(pixel_values.shape[0], -1).to(device)
    if settings.do_sample:
        torch.manual_seed(settings.seed)
    generated = model.generate(**inputs, **settings.generate_kwargs())
    return processor.decode_captions(generated, prompt=settings.prompt or None)


def _write(
    names: list[str],
    captions: list[str],
    scores: list[float] | None,
    per_image: int,
    writer,
    sidecar: str | None,
    files: set[str],
) -> None:
    """Each image's captions (and scores) to the JSON-lines file, and to a sidecar where the image is a file."""
    for index, name in enumerate(names):
        own = slice(index * per_image, (index + 1) * per_image)
        if sidecar is not None and name in files:
            write_sidecar(name, sidecar, "\n".join(captions[own]))
        if writer is not None:
            record: dict[str, Any] = {"image": name, "caption": captions[own][0]}
            if per_image > 1:
                record["captions"] = captions[own]
            if scores is not None:
                record.update({"itm_scores": scores[own]} if per_image > 1 else {"itm_score": scores[own][0]})
            writer.write(json.dumps(record, ensure_ascii=False) + "\n")
    if writer is not None:
        # A batch is on disk before the next one starts: a killed run loses at most the batch in flight.
        writer.flush()
        os.fsync(writer.fileno())


__all__ = ["CaptionRun", "CaptionSettings", "caption_images", "collect_images", "read_done", "write_sidecar"]
