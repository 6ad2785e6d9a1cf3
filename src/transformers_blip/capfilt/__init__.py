"""CapFilt, BLIP's dataset bootstrapping: a captioner writes synthetic captions for web images, a filter removes
the texts (web or synthetic) that do not match their image, and what is left pretrains a new model.

`bootstrap` is the library (`training_scripts/capfilt.py` parses arguments and calls it); `write_report` draws what
a run kept and removed. `data.load_capfilt_output` reads the result back.
"""

from ..itm_scoring import score_texts
from .bootstrap import (
    OUTPUT_FORMATS,
    CapFiltSettings,
    CapFiltSummary,
    GumbelSampling,
    InputShard,
    ShardResult,
    bootstrap,
    caption_seed,
    commit_shard,
    dataset_shards,
    finished_marker,
    generate_captions,
    iter_scores,
    process_shard,
    webdataset_shards,
    write_manifest,
)
from .report import FilterQuality, draw_histogram, filter_quality, write_report

__all__ = [
    "OUTPUT_FORMATS",
    "CapFiltSettings",
    "CapFiltSummary",
    "FilterQuality",
    "GumbelSampling",
    "InputShard",
    "ShardResult",
    "bootstrap",
    "caption_seed",
    "commit_shard",
    "dataset_shards",
    "draw_histogram",
    "filter_quality",
    "finished_marker",
    "generate_captions",
    "iter_scores",
    "process_shard",
    "score_texts",
    "webdataset_shards",
    "write_manifest",
    "write_report",
]
