"""`pipeline("image-to-text")` and `pipeline("visual-question-answering")` on our models without `trust_remote_code`
when this package is installed.

A saved model names its pipeline classes in the config's `custom_pipelines`, for loading with `trust_remote_code=True`
where the package is absent (see pipelines.py). transformers 5 resolves such a task only from the repository's copy
of the code, or from a `pipeline_class` argument: it redirects `image-to-text` to `image-text-to-text` and has
removed `visual-question-answering`, and its `PIPELINE_REGISTRY` is consulted only after both. So importing the
package wraps `transformers.pipeline` once: for those two tasks on a model of ours, with no `pipeline_class` given
and remote code not trusted, it passes the installed package's class as `pipeline_class`. The code that runs is the
installed package's, never the repository's, which is what refusing remote code protects. Everything else goes to
transformers' `pipeline` untouched, and `trust_remote_code=True` keeps loading the repository's copy.

`from transformers import pipeline` picks the wrapper up when it runs after `import transformers_blip`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import transformers
import transformers.pipelines
from transformers import PretrainedConfig

from .configuration_blip import BlipConfig
from .pipelines import BlipImageToTextPipeline, BlipVisualQuestionAnsweringPipeline

PIPELINE_CLASSES = {
    "image-to-text": BlipImageToTextPipeline,
    "visual-question-answering": BlipVisualQuestionAnsweringPipeline,
}
# What `pipeline` passes to the hub when it reads a config: the same applies to our look at it.
_HUB_ARGUMENTS = ("revision", "token", "local_files_only", "cache_dir")


def _is_ours(model: Any, config: Any, kwargs: dict) -> bool:
    """Whether `pipeline(model=model, config=config)` names one of our models: the path or hub id of a directory
    whose config is ours. (A model instance is left to transformers, which redirects `image-to-text` before any
    config is read; such a caller builds `BlipImageToTextPipeline(model=..., processor=...)` directly.)"""
    source = config if isinstance(config, (str, os.PathLike)) else model
    if not isinstance(source, (str, os.PathLike)):
        return False
    hub_arguments = {name: kwargs[name] for name in _HUB_ARGUMENTS if kwargs.get(name) is not None}
    try:
        saved, _ = PretrainedConfig.get_config_dict(os.fspath(source), **hub_arguments)
    except (OSError, ValueError):
        return False  # transformers' pipeline reports what is wrong with the source
    return saved.get("model_type") == BlipConfig.model_type


def installed_pipeline_class(task: str | None, model: Any, config: Any, kwargs: dict) -> type | None:
    """The installed class that serves `task` for `model`, or None where transformers' own resolution applies."""
    if task not in PIPELINE_CLASSES or kwargs.get("pipeline_class") is not None or kwargs.get("trust_remote_code"):
        return None
    return PIPELINE_CLASSES[task] if _is_ours(model, config, kwargs) else None


def serve_installed_pipelines() -> None:
    """Wraps `transformers.pipeline` (once) so that our tasks on our models use the installed classes."""
    original = transformers.pipelines.pipeline
    if getattr(original, "serves_blip_pipelines", False):
        return

    @functools.wraps(original)
    def pipeline(task: str | None = None, model: Any = None, *args, **kwargs):
        config = args[0] if args else kwargs.get("config")
        pipeline_class = installed_pipeline_class(task, model, config, kwargs)
        if pipeline_class is not None:
            kwargs["pipeline_class"] = pipeline_class
        return original(task, model, *args, **kwargs)

    pipeline.serves_blip_pipelines = True
    transformers.pipelines.pipeline = pipeline
    transformers.pipeline = pipeline


__all__ = ["PIPELINE_CLASSES", "installed_pipeline_class", "serve_installed_pipelines"]
