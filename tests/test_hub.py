"""The model cards name each head's task; `push_to_hub` takes transformers' arguments and uploads BLIP's card.
Nothing here reaches the network: the two hub calls are replaced."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import PreTrainedModel

from transformers_blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipForVisualReasoning,
    BlipModel,
)


def card_metadata(readme: str) -> dict:
    """The YAML front matter of a model card."""
    _, front_matter, _ = readme.split("---\n", 2)
    return yaml.safe_load(front_matter)


@pytest.mark.parametrize(
    "head,tag",
    [
        (BlipModel, "zero-shot-image-classification"),
        (BlipForImageTextRetrieval, "feature-extraction"),
        (BlipForConditionalGeneration, "image-to-text"),
        (BlipForQuestionAnswering, "visual-question-answering"),
        (BlipForVisualReasoning, None),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_model_cards_name_the_task_each_head_serves(tmp_path, config, head, tag):
    head(config).save_pretrained(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    metadata = card_metadata(readme)
    assert metadata.get("pipeline_tag") == tag
    assert metadata["library_name"] == "transformers" and "blip" in metadata["tags"]
    if tag == "zero-shot-image-classification":
        assert 'pipeline("zero-shot-image-classification"' in readme


def test_a_users_card_is_kept(tmp_path, config):
    (tmp_path / "README.md").write_text("my own card")
    BlipModel(config).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "my own card"


def test_push_to_hub_keeps_transformers_signature():
    ours = inspect.signature(BlipModel.push_to_hub).parameters
    theirs = inspect.signature(PreTrainedModel.push_to_hub).parameters
    assert list(ours) == list(theirs)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces the hub calls of an upload (the repo has no card yet); records what they were given and the
    folder's files."""
    calls = {}

    class Repo:
        repo_id = "someone/blip-features"

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return Repo()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = {"repo_id": repo_id, **kwargs}
        calls["files"] = {p.name for p in folder.iterdir()}
        calls["card"] = (folder / "README.md").read_text()
        calls["config"] = json.loads((folder / "config.json").read_text())
        return "commit"

    def load_card(repo_id, **kwargs):
        raise EntryNotFoundError(f"{repo_id} has no README.md")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(ModelCard, "load", load_card)
    return calls


def test_push_to_hub_uploads_blips_card_with_transformers_arguments(config, fake_hub):
    torch.manual_seed(0)
    model = BlipModel(config)
    result = model.push_to_hub(
        "blip-features",
        commit_message="first",
        commit_description="tiny features",
        private=True,
        create_pr=True,
        max_shard_size="100KB",
        tags=["tiny"],
    )
    assert result == "commit"
    assert fake_hub["create_repo"]["repo_id"] == "blip-features" and fake_hub["create_repo"]["private"] is True
    upload = fake_hub["upload"]
    assert upload["repo_id"] == "someone/blip-features"
    assert (upload["commit_message"], upload["commit_description"], upload["create_pr"]) == (
        "first",
        "tiny features",
        True,
    )
    # max_shard_size reached save_pretrained: the weights (tens of kB) were split.
    assert "model.safetensors.index.json" in fake_hub["files"]
    metadata = card_metadata(fake_hub["card"])
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert "tiny" in metadata["tags"] and "blip" in metadata["tags"]
    assert "someone/blip-features" in fake_hub["card"]
    assert fake_hub["config"]["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_blip.BlipModel"


def test_push_to_hub_refuses_unknown_arguments(config, fake_hub):
    with pytest.raises(TypeError, match="safe_serialisation"):
        BlipModel(config).push_to_hub("blip-features", safe_serialisation=True)


def test_push_to_hub_keeps_the_repos_own_card(config, fake_hub, monkeypatch):
    own_card = ModelCard("---\nlicense: mit\ntags:\n- mine\n---\n\n# My BLIP\n")
    monkeypatch.setattr(ModelCard, "load", lambda repo_id, **kwargs: own_card)
    BlipModel(config).push_to_hub("blip-features", tags=["tiny"])
    metadata = card_metadata(fake_hub["card"])
    assert "# My BLIP" in fake_hub["card"] and metadata["license"] == "mit"
    assert {"mine", "tiny"} <= set(metadata["tags"])
