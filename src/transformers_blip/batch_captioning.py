"""Captioning many images: gather the inputs, decode them in DataLoader workers, caption in batches, write results
that survive an interruption.

The output is a JSON-lines file (one `{"image", "caption"}` per image) and/or a sidecar text file beside each image.
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
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .data.decoding import IMAGE_EXTENSIONS
from .image_processing_blip import ImageDecodeError, decode_image

logger = logging.getLogger(__name__)

LIST_FILE_SUFFIXES = (".txt", ".lst")


@dataclass
class CaptionRun:
    """What a run did: captioned, skipped as already done, and the inputs that failed, each with its reason."""

    captioned: int = 0
    already_done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"captioned {self.captioned} image(s)"
        if self.already_done:
            text += f", {self.already_done} already done"
        if self.failed:
            text += f", {len(self.failed)} failed"
        return text


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(path for path in candidates if path.is_file() and _is_image_file(path))


def _listed_paths(list_file: Path) -> list[Path]:
    """The paths in a text file, one a line; relative ones start at the file's folder."""
    lines = list_file.read_text(encoding="utf-8").splitlines()
    return [list_file.parent / line.strip() for line in lines if line.strip() and not line.startswith("#")]


def collect_images(inputs: Sequence[str | os.PathLike], recursive: bool, run: CaptionRun) -> list[str]:
    """The image files that `inputs` name: files, folders (and their subfolders with `recursive`), and text files
    listing paths. An input that does not exist, or a folder without images, is recorded in `run.failed`."""
    images: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = _folder_images(path, recursive)
            if not found:
                hint = "" if recursive else " (add --recursive for its subfolders)"
                run.failed.append((str(path), f"no image files in this folder{hint}"))
            images += [str(image) for image in found]
        elif path.is_file() and path.suffix.lower() in LIST_FILE_SUFFIXES:
            images += [str(listed) for listed in _listed_paths(path)]
        elif path.is_file():
            images.append(str(path))
        else:
            run.failed.append((str(path), "no such file or folder"))
    # One caption per image, in the order given, even where two inputs name the same file.
    return list(dict.fromkeys(images))


class _DecodedImages(Dataset):
    """Images decoded and turned into pixels in the DataLoader workers; a bad one becomes its error message."""

    def __init__(self, paths: Sequence[str], image_processor: Any):
        self.paths = list(paths)
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            image = decode_image(path)
        except (ImageDecodeError, OSError) as error:
            return path, None, str(error)
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return path, pixels, None


def _keep_rows(rows: list[tuple[str, torch.Tensor | None, str | None]]) -> list:
    return rows  # batches stay lists: the main process splits decoded images from failures


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
    target = Path(image_path).with_suffix(suffix)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


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


def _batches(loader: DataLoader, run: CaptionRun) -> Iterator[tuple[list[str], torch.Tensor]]:
    for rows in loader:
        for path, _, error in rows:
            if error is not None:
                run.failed.append((path, error))
                logger.warning(f"skipped {path}: {error}")
        good = [(path, pixels) for path, pixels, error in rows if error is None]
        if good:
            yield [path for path, _ in good], torch.stack([pixels for _, pixels in good])


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
) -> CaptionRun:
    """Caption `paths` with `model` (a `BlipForConditionalGeneration`) and `processor`, writing as it goes.

    Args:
        output: a JSON-lines file, appended to; the images it already holds are skipped (resume).
        sidecar: a suffix such as `".txt"`: write each caption beside its image.
        skip_existing: skip images whose sidecar exists already.
    """
    run = run if run is not None else CaptionRun()
    if output is None and sidecar is None:
        raise ValueError("nowhere to write the captions: give an output file, a sidecar suffix, or both")
    output = Path(output) if output is not None else None
    done = read_done(output) if output is not None else set()
    if skip_existing and sidecar is not None:
        done |= {path for path in paths if Path(path).with_suffix(sidecar).exists()}
    todo = [path for path in paths if path not in done]
    run.already_done += len(paths) - len(todo)
    model.to(device=device, dtype=dtype).eval()
    prompt_inputs = processor.tokenizer(settings.prompt, return_tensors="pt") if settings.prompt else None
    loader = DataLoader(
        _DecodedImages(todo, processor.image_processor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_keep_rows,
    )
    writer = open(output, "a", encoding="utf-8") if output is not None else None
    bar = tqdm(total=len(todo), unit="img", desc="Captioning", disable=not progress)
    try:
        for batch_paths, pixel_values in _batches(loader, run):
            captions = _caption_batch(model, processor, pixel_values, prompt_inputs, settings, device, dtype)
            _write(batch_paths, captions, settings.num_captions, writer, sidecar)
            run.captioned += len(batch_paths)
            bar.update(len(batch_paths))
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


def _write(paths: list[str], captions: list[str], per_image: int, writer, sidecar: str | None) -> None:
    for index, path in enumerate(paths):
        own = captions[index * per_image : (index + 1) * per_image]
        if sidecar is not None:
            write_sidecar(path, sidecar, "\n".join(own))
        if writer is not None:
            record = {"image": path, "caption": own[0]}
            if per_image > 1:
                record["captions"] = own
            writer.write(json.dumps(record, ensure_ascii=False) + "\n")
    if writer is not None:
        # A batch is on disk before the next one starts: a killed run loses at most the batch in flight.
        writer.flush()
        os.fsync(writer.fileno())


__all__ = ["CaptionRun", "CaptionSettings", "caption_images", "collect_images", "read_done", "write_sidecar"]
