"""The package's layout: names that moved still import from their old paths, with a warning, for one release."""

import importlib
import subprocess
import sys

import pytest

MOVED_MODULES = {
    "transformers_blip.data.synthetic": "transformers_blip.benchmark.build",
    "transformers_blip.data.synthetic_language": "transformers_blip.benchmark.language",
    "transformers_blip.data.synthetic_scenes": "transformers_blip.benchmark.scenes",
    "transformers_blip.data.export": "transformers_blip.benchmark.export",
}
MOVED_NAMES = [
    ("transformers_blip.data", "build_synthetic_benchmark", "transformers_blip.benchmark"),
    ("transformers_blip.data", "export_benchmark", "transformers_blip.benchmark"),
    ("transformers_blip.data", "save_sample_grid", "transformers_blip.benchmark"),
    ("transformers_blip.data", "EXPORT_FORMATS", "transformers_blip.benchmark"),
    ("transformers_blip.training", "itc_retrieval_recall", "transformers_blip.evaluation"),
    ("transformers_blip.training", "itc_features", "transformers_blip.evaluation"),
    ("transformers_blip.training", "recall_at_k", "transformers_blip.evaluation"),
]


@pytest.mark.parametrize("old, new", sorted(MOVED_MODULES.items()))
def test_moved_module_imports_from_its_old_path(old, new):
    # A fresh interpreter: the warning is raised once, at the first import of the old path.
    code = f"import warnings; warnings.simplefilter('error'); import {old}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "FutureWarning" in result.stderr and new in result.stderr
    with pytest.warns(FutureWarning):
        sys.modules.pop(old, None)
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


@pytest.mark.parametrize("old_module, name, new_module", MOVED_NAMES)
def test_moved_name_imports_from_its_old_module(old_module, name, new_module):
    with pytest.warns(FutureWarning, match=new_module):
        value = getattr(importlib.import_module(old_module), name)
    assert value is getattr(importlib.import_module(new_module), name)


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError):
        importlib.import_module("transformers_blip.data").no_such_loader  # noqa: B018


def test_task_head_from_pretraining_keeps_its_loading_info_for_one_release():
    import torch
    from conftest import make_config

    from transformers_blip import BlipForConditionalGeneration
    from transformers_blip.convert.pretraining import task_head_from_pretraining
    from transformers_blip.modeling_pretraining import BlipForPreTraining

    torch.manual_seed(0)
    pretraining = BlipForPreTraining(make_config())
    with pytest.warns(FutureWarning, match="output_report"):
        head, info = task_head_from_pretraining(BlipForConditionalGeneration, pretraining, output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert torch.equal(head.text_decoder.cls.predictions.bias, pretraining.text_decoder.cls.predictions.bias)
