"""BLIP's model sizes by name (tiny, base, large) and the pretraining config each one gives."""

from __future__ import annotations

from ..configuration_blip import BlipConfig, BlipTextConfig, BlipVisionConfig

# Encoder sizes by name, with their pretraining defaults: the paper's ViT-B/16 and ViT-L/16 with BERT-base, and a
# tiny model that learns the synthetic benchmark on a laptop CPU in minutes. The tiny run trains from scratch for a
# thousand steps or so, which changes three defaults. Momentum 0.9, so that the momentum encoders keep up. No queue:
# with keys from fast-moving momentum encoders the model learns to tell this step's keys from the queued ones instead
# of matching images with texts (the queue pays off with the slow momentum and the long runs of real pretraining).
# A temperature of at most 0.1: while the features cannot yet tell pairs apart the learned temperature climbs, which
# weakens ITC's gradients for hundreds of steps.
MODEL_SIZES = {
    "tiny": {
        "vision": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4},
        "text": {
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        "patch_size": 8,
        "embed_dim": 64,
        "pretraining": {"queue_size": 0, "momentum": 0.9, "itc_temperature_max": 0.1},
    },
    "base": {
        "vision": {},
        "text": {},
        "patch_size": 16,
        "embed_dim": 256,
        "pretraining": {"queue_size": 57600, "momentum": 0.995},
    },
    "large": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text": {},
        "patch_size": 16,
        "embed_dim": 256,
        "pretraining": {"queue_size": 57600, "momentum": 0.995},
    },
}


def pretraining_config(
    model_size: str, image_size: int, token_kwargs: dict[str, int], **pretraining_fields
) -> BlipConfig:
    """A `BlipConfig` of one of `MODEL_SIZES` for `image_size` pixels, with the tokenizer's ids (`token_kwargs`, from
    `text_config_token_kwargs`) and pretraining fields (queue_size, momentum, alpha, ...); fields given as `None`
    take the size's defaults."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size must be one of {sorted(MODEL_SIZES)}, got {model_size!r}")
    size = MODEL_SIZES[model_size]
    vision_config = BlipVisionConfig(image_size=image_size, patch_size=size["patch_size"], **size["vision"])
    text_config = BlipTextConfig(**size["text"], **token_kwargs)
    fields = {
        **size["pretraining"],
        **{name: value for name, value in pretraining_fields.items() if value is not None},
    }
    return BlipConfig(text_config=text_config, vision_config=vision_config, embed_dim=size["embed_dim"], **fields)


__all__ = ["MODEL_SIZES", "pretraining_config"]
