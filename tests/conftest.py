"""Shared fixtures: a tiny BLIP config, a tiny tokenizer and processor, random images. Nothing here touches the hub."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast

from transformers_blip import BlipConfig, BlipImageTextProcessor, BlipTextConfig, BlipVisionConfig, build_processor

WORDS = (
    "a picture of photo red blue green yellow square circle triangle small big left right "
    "what colour is the ? how many"
).split()


def tiny_vocab() -> list[str]:
    """bert-base-uncased's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102) around a few words: 126 tokens."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    return vocab + [f"[filler{i}]" for i in range(126 - len(vocab))]


def make_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer whose last two ids are [DEC] (126) and [ENC] (127), as BLIP's are."""
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(tiny_vocab())})
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def make_config(image_size: int = 32, **overrides) -> BlipConfig:
    text = BlipTextConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    vision = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    return BlipConfig(text_config=text, vision_config=vision, **overrides)


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture
def config() -> BlipConfig:
    return make_config()


@pytest.fixture
def tokenizer() -> BertTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def processor(tokenizer) -> BlipImageTextProcessor:
    return build_processor(tokenizer, image_size=32)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def text_ids() -> torch.Tensor:
    """[CLS] w w w w w [SEP] for 3 texts, words drawn from the tiny vocabulary."""
    words = torch.randint(104, 126, (3, 5), generator=torch.Generator().manual_seed(1))
    return torch.cat([torch.full((3, 1), 101), words, torch.full((3, 1), 102)], dim=1)


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory):
    """A tiny BLIP pretrained on the synthetic benchmark by training_scripts/pretrain.py, once per test session
    (about 5 minutes on 2 cores): the pretraining learning test checks it, the fine-tuning learning tests start
    from it. The run directory: the model, its tokenizer, `trainer_state.json`, `held_out_results.json`."""
    from learning_runs import pretrain_tiny

    return pretrain_tiny(tmp_path_factory.mktemp("pretrained_tiny"))
