"""Data for BLIP: loaders for real formats, robust decoding, skips, streaming, transforms, text cleaning.

The synthetic benchmark lives in `transformers_blip.benchmark`; its names are still importable from here for one
more release.
"""

from .annotations import stable_id
from .bootstrapped import capfilt_files, load_capfilt_output, read_capfilt_manifest
from .decoding import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, decode_text, load_image, to_rgb
from .hub_datasets import HUB_TASKS, HubDatasetArguments, load_hub_splits
from .loaders import (
    load_caption_json,
    load_coco_karpathy,
    load_image_folder,
    load_nlvr,
    load_parquet,
    load_vqa,
    vqa_answer_list,
    vqa_answer_weights,
)
from .pairs import flatten_captions
from .robust import DecodeImages, SkippingCollator, collate_rows, drop_skipped
from .skips import SKIP_REASONS, BadFileError, BadSampleError, SkippedSample, SkipReport
from .streaming import expand_shards, load_webdataset, stream_parquet
from .text import MAX_WORDS, mentions_sides, pre_caption, pre_question, swap_sides
from .transforms import (
    BLIP_AUGMENTATIONS,
    BLIP_IMAGE_MEAN,
    BLIP_IMAGE_STD,
    BlipEvalTransform,
    BlipTrainTransform,
    RandAugment,
    mirror_pair,
    to_normalized_tensor,
)

__all__ = [
    "BLIP_AUGMENTATIONS",
    "BLIP_IMAGE_MEAN",
    "BLIP_IMAGE_STD",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "HUB_TASKS",
    "MAX_WORDS",
    "SKIP_REASONS",
    "BadFileError",
    "BadSampleError",
    "BlipEvalTransform",
    "BlipTrainTransform",
    "DecodeImages",
    "HubDatasetArguments",
    "RandAugment",
    "SkipReport",
    "SkippedSample",
    "SkippingCollator",
    "capfilt_files",
    "collate_rows",
    "decode_text",
    "drop_skipped",
    "expand_shards",
    "flatten_captions",
    "load_caption_json",
    "load_capfilt_output",
    "load_coco_karpathy",
    "load_hub_splits",
    "load_image",
    "load_image_folder",
    "load_nlvr",
    "load_parquet",
    "load_vqa",
    "load_webdataset",
    "mentions_sides",
    "mirror_pair",
    "pre_caption",
    "pre_question",
    "read_capfilt_manifest",
    "stable_id",
    "stream_parquet",
    "swap_sides",
    "to_normalized_tensor",
    "to_rgb",
    "vqa_answer_list",
    "vqa_answer_weights",
]


_MOVED_TO_BENCHMARK = ("EXPORT_FORMATS", "build_synthetic_benchmark", "export_benchmark", "save_sample_grid")


def __getattr__(name: str):
    if name in _MOVED_TO_BENCHMARK:
        import warnings

        from .. import benchmark

        warnings.warn(
            f"transformers_blip.data.{name} moved to transformers_blip.benchmark", FutureWarning, stacklevel=2
        )
        return getattr(benchmark, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
