"""BLIP's metrics as local `evaluate` modules, loadable offline: `evaluate.load(metric_path("caption"))`."""

from pathlib import Path

METRIC_NAMES = ("caption", "vqa", "nlvr", "retrieval")


def metric_path(name: str) -> str:
    """The directory to give `evaluate.load` for one of `METRIC_NAMES`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; choose one of {METRIC_NAMES}")
    return str(Path(__file__).parent / f"blip_{name}")


__all__ = ["METRIC_NAMES", "metric_path"]
