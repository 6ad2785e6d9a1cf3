"""What a saved BLIP model carries besides its weights (the pipeline file, `custom_pipelines`, extra Auto classes, a
model card), and the upload of all of it to the hub."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

from .pipelines import CUSTOM_PIPELINES

if TYPE_CHECKING:
    from .modeling_blip import BlipPreTrainedModel

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
    "zero-shot-image-classification": """```python
from transformers import pipeline

classifier = pipeline("zero-shot-image-classification", model="{repo_id}", trust_remote_code=True)
classifier("photo.jpg", candidate_labels=["a red square", "a blue circle"])  # [{{'score': ..., 'label': ...}}, ...]
```""",
}


def add_pipeline_files(save_directory: str | os.PathLike, tasks: tuple[str, ...]) -> None:
    """Copies `pipelines.py` beside the weights, where `custom_pipelines` points `trust_remote_code` loading."""
    if tasks:
        shutil.copy(PIPELINES_FILE, os.path.join(save_directory, "pipelines.py"))


def custom_pipelines_for(tasks: tuple[str, ...]) -> dict:
    """The `custom_pipelines` entry of a config for the tasks a head serves."""
    return {task: CUSTOM_PIPELINES[task] for task in tasks}


def model_card(
    model_class_name: str,
    pipeline_tag: str | None,
    repo_id: str = "path/to/model",
    tags: list[str] | None = None,
    metrics: dict[str, float] | None = None,
    dataset_name: str | None = None,
) -> ModelCard:
    """A model card naming the task, the library and how to load the model; `tags` are added to BLIP's.

    `metrics` (name -> value, e.g. `{"test_CIDEr": 1.2}`), measured on `dataset_name`, go into a results table and
    the card's `model-index`, where the hub shows them beside the model.
    """
    all_tags = ["blip", "transformers-blip", "custom_code"]
    all_tags += [tag for tag in tags or [] if tag not in all_tags]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=all_tags,
        license="bsd-3-clause",
        model_name=repo_id.rsplit("/", 1)[-1] if metrics else None,
        eval_results=_eval_results(pipeline_tag, metrics, dataset_name) if metrics else None,
    )
    usage = _USAGE.get(pipeline_tag or "", "").format(repo_id=repo_id)
    task = f"Its task: `{pipeline_tag}`." if pipeline_tag else "It serves no pipeline task."
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n"
        f"# {model_class_name}\n\n"
        "A BLIP model (Bootstrapping Language-Image Pre-training, Li et al., ICML 2022) saved by transformers-blip. "
        f"{task}\n\n"
        "It loads with `trust_remote_code=True` where transformers-blip is not installed, and without it where the "
        "package is installed (`import transformers_blip`).\n\n"
        f"{usage}\n"
        f"{_results_section(metrics, dataset_name) if metrics else ''}"
    )
    return ModelCard(content)


def _eval_results(pipeline_tag: str | None, metrics: dict[str, float], dataset_name: str | None) -> list[EvalResult]:
    dataset = dataset_name or "synthetic"
    return [
        EvalResult(
            task_type=pipeline_tag or "other",
            dataset_type=dataset,
            dataset_name=dataset,
            metric_type=name,
            metric_value=value,
        )  # fmt: skip
        for name, value in metrics.items()
    ]


def _results_section(metrics: dict[str, float], dataset_name: str | None) -> str:
    rows = "".join(f"| {name} | {value:.4g} |\n" for name, value in metrics.items())
    where = f" on `{dataset_name}`" if dataset_name else ""
    return f"\n## Results\n\nMeasured at the end of fine-tuning{where}:\n\n| metric | value |\n|---|---|\n{rows}"


def numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a run's metrics, nested dictionaries flattened (`{"test": {"CIDEr": 1.2}}` -> `test_CIDEr`)."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(numeric_metrics(value, f"{prefix}{name}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{name}"] = float(value)
    return flat


def push_task_card(
    model: BlipPreTrainedModel,
    repo_id: str,
    metrics: dict,
    dataset_name: str | None = None,
    save_directory: str | os.PathLike | None = None,
    token: bool | str | None = None,
):
    """Replaces the card of a fine-tuned model's hub repo by BLIP's card with the task's metrics, as one commit.

    Trainer's `push_to_hub` uploads its own generic card; a fine-tuning script calls this once its final metrics
    are known (`metrics` may nest, see `numeric_metrics`). The card is also written to `save_directory`/README.md.
    """
    card = model_card(
        type(model).__name__, model.pipeline_tag, repo_id, list(model.model_tags or []), numeric_metrics(metrics),
        dataset_name,
    )  # fmt: skip
    if save_directory is not None:
        card.save(os.path.join(save_directory, "README.md"))
    return HfApi(token=token).upload_file(
        path_or_fileobj=str(card).encode("utf-8"),
        path_in_repo="README.md",
        repo_id=repo_id,
        commit_message="Model card with the task's metrics",
    )


def write_model_card(save_directory: str | os.PathLike, model_class_name: str, pipeline_tag: str | None) -> None:
    """Writes README.md unless the directory already has one (a user's own card is never overwritten)."""
    path = os.path.join(save_directory, "README.md")
    if not os.path.exists(path):
        model_card(model_class_name, pipeline_tag).save(path)


def prepare_config_for_saving(model: BlipPreTrainedModel) -> None:
    """Writes into the model's config what a saved directory needs to serve its tasks: `custom_pipelines`, and the
    extra Auto classes of `auto_map` under which remote code loads the head."""
    if model.pipeline_tasks:
        model.config.custom_pipelines = custom_pipelines_for(model.pipeline_tasks)
    if model._auto_class is not None and model.extra_auto_classes:
        module_file = type(model).__module__.rsplit(".", 1)[-1]
        extra = dict.fromkeys(model.extra_auto_classes, f"{module_file}.{type(model).__name__}")
        model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **extra}


def write_hub_files(model: BlipPreTrainedModel, save_directory: str | os.PathLike) -> None:
    """The files a saved model carries besides weights, config and code: `pipelines.py` and the model card."""
    add_pipeline_files(save_directory, model.pipeline_tasks)
    write_model_card(save_directory, type(model).__name__, model.pipeline_tag)


def _existing_model_card(repo_id: str, token: bool | str | None) -> ModelCard | None:
    """The model card of a hub repo, or `None` when it has none (a new repo)."""
    try:
        return ModelCard.load(repo_id, token=token)
    except EntryNotFoundError:
        return None


def upload_to_hub(
    model: BlipPreTrainedModel,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    """Uploads what `save_pretrained` writes, with a model card that names the repo, as one commit.

    The arguments are those of transformers' `PreTrainedModel.push_to_hub`. As there, a card the repo already has is
    kept (and given the tags); a repo without one gets BLIP's card (task, usage, license) rather than a generic one.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    all_tags = list(model.model_tags or []) + [tag for tag in tags or [] if tag not in (model.model_tags or [])]
    card = _existing_model_card(repo_id, token)
    if card is None:
        card = model_card(type(model).__name__, model.pipeline_tag, repo_id, all_tags)
    else:
        card.data.tags = (card.data.tags or []) + [tag for tag in all_tags if tag not in (card.data.tags or [])]
    with tempfile.TemporaryDirectory() as work_dir:
        model.save_pretrained(work_dir, max_shard_size=max_shard_size)
        card.save(os.path.join(work_dir, "README.md"))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=work_dir,
            commit_message=commit_message or f"Upload {type(model).__name__}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
