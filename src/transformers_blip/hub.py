"""What a saved BLIP model carries besides its weights: the pipeline file, `custom_pipelines`, a model card."""

from __future__ import annotations

import os
import shutil

from huggingface_hub import ModelCard, ModelCardData

from .pipelines import CUSTOM_PIPELINES

# Written beside the weights: `custom_pipelines` points `trust_remote_code` loading at this file.
PIPELINES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipelines.py")

_USAGE = {
    "image-to-text": """```python
from transformers import pipeline

captioner = pipeline("image-to-text", model="{repo_id}", trust_remote_code=True)
captioner("photo.jpg")  # [{{'generated_text': '...'}}]
```""",
    "visual-question-answering": """```python
from transformers import pipeline

vqa = pipeline("visual-question-answering", model="{repo_id}", trust_remote_code=True)
vqa(image="photo.jpg", question="what colour is the square?")  # [{{'answer': '...', 'score': ...}}]
```""",
}


def add_pipeline_files(save_directory: str | os.PathLike, tasks: tuple[str, ...]) -> None:
    """Copies `pipelines.py` beside the weights, where `custom_pipelines` points `trust_remote_code` loading."""
    if tasks:
        shutil.copy(PIPELINES_FILE, os.path.join(save_directory, "pipelines.py"))


def custom_pipelines_for(tasks: tuple[str, ...]) -> dict:
    """The `custom_pipelines` entry of a config for the tasks a head serves."""
    return {task: CUSTOM_PIPELINES[task] for task in tasks}


def model_card(model_class_name: str, pipeline_tag: str | None, repo_id: str = "path/to/model") -> ModelCard:
    """A model card naming the task, the library and how to load the model."""
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["blip", "transformers-blip", "custom_code"],
        license="bsd-3-clause",
    )
    usage = _USAGE.get(pipeline_tag or "", "").format(repo_id=repo_id)
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n"
        f"# {model_class_name}\n\n"
        "A BLIP model (Bootstrapping Language-Image Pre-training, Li et al., ICML 2022) saved by transformers-blip. "
        f"Its task: `{pipeline_tag or 'feature extraction'}`.\n\n"
        "It loads with `trust_remote_code=True` where transformers-blip is not installed, and without it where the "
        "package is installed (`import transformers_blip`).\n\n"
        f"{usage}\n"
    )
    return ModelCard(content)


def write_model_card(save_directory: str | os.PathLike, model_class_name: str, pipeline_tag: str | None) -> None:
    """Writes README.md unless the directory already has one (a user's own card is never overwritten)."""
    path = os.path.join(save_directory, "README.md")
    if not os.path.exists(path):
        model_card(model_class_name, pipeline_tag).save(path)
