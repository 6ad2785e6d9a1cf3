"""Data for BLIP: the synthetic benchmark, loaders for real formats, robust decoding, transforms, text cleaning."""

from .decoding import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, decode_text, load_image, to_rgb
from .export import EXPORT_FORMATS, export_benchmark
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
from .skips import SKIP_REASONS, BadSampleError, SkippedSample, SkipReport
from .streaming import expand_shards, load_webdataset, stream_parquet
from .synthetic import build_synthetic_benchmark, save_sample_grid
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
    "EXPORT_FORMATS",
    "MAX_WORDS",
    "SKIP_REASONS",
    "BadSampleError",
    "BlipEvalTransform",
    "BlipTrainTransform",
    "DecodeImages",
    "RandAugment",
    "SkipReport",
    "SkippedSample",
    "SkippingCollator",
    "build_synthetic_benchmark",
    "collate_rows",
    "decode_text",
    "drop_skipped",
    "expand_shards",
    "export_benchmark",
    "flatten_captions",
    "load_caption_json",
    "load_coco_karpathy",
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
    "save_sample_grid",
    "stream_parquet",
    "swap_sides",
    "to_normalized_tensor",
    "to_rgb",
    "vqa_answer_list",
    "vqa_answer_weights",
]
