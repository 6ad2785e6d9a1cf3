"""The synthetic benchmark: data the project makes itself (scenes, their language, export to real formats)."""

from .build import benchmark_texts, build_synthetic_benchmark, save_sample_grid
from .export import EXPORT_FORMATS, export_benchmark, write_webdataset_shards

__all__ = [
    "EXPORT_FORMATS",
    "benchmark_texts",
    "build_synthetic_benchmark",
    "export_benchmark",
    "save_sample_grid",
    "write_webdataset_shards",
]
