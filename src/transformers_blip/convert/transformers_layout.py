"""transformers' own BLIP layout (what the hub's `Salesforce/blip-*` repos hold) <-> ours.

Our heads use transformers' module names, so loading needs no renaming: `BlipForConditionalGeneration
.from_pretrained("Salesforce/blip-image-captioning-base")` reads the weights as they are, and `BlipConfig.from_dict`
translates the `model_type: "blip"` config. Writing back is the reverse: the same tensors (minus what transformers'
classes do not have) and a config in its vocabulary.
"""

from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from ..modeling_blip import BlipPreTrainedModel

# Our head class name -> transformers' class name for the same head.
TRANSFORMERS_ARCHITECTURES = {
    "BlipForConditionalGeneration": "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval": "BlipForImageTextRetrieval",
    "BlipForQuestionAnswering": "BlipForQuestionAnswering",
}
# Tensors of ours that transformers' BLIP classes do not have.
_NOT_IN_TRANSFORMERS = ("temp",)


def save_in_transformers_layout(model: BlipPreTrainedModel, save_directory: str | os.PathLike) -> None:
    """Writes `model` so that transformers' own BLIP class of the same head loads it with `from_pretrained`."""
    head = type(model).__name__
    if head not in TRANSFORMERS_ARCHITECTURES:
        raise ValueError(
            f"transformers' BLIP has no counterpart of {head}; supported: {sorted(TRANSFORMERS_ARCHITECTURES)}"
        )
    os.makedirs(save_directory, exist_ok=True)
    config = model.config.to_transformers_dict()
    config["architectures"] = [TRANSFORMERS_ARCHITECTURES[head]]
    with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)

    state_dict = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if name in _NOT_IN_TRANSFORMERS or tensor.data_ptr() in seen:
            continue  # tied tensors are stored once, as transformers does
        seen.add(tensor.data_ptr())
        state_dict[name] = tensor.detach().contiguous().cpu()
    save_file(state_dict, os.path.join(save_directory, "model.safetensors"), metadata={"format": "pt"})
