"""Mixed precision: under bf16 autocast the contrastive similarities and losses stay fp32, and the tiny model trains
50 steps without NaN and with losses close to fp32's."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_pretraining import make_batch, make_model

from transformers_blip.losses import diagonal_positives, itc_loss, similarity_logits


def normalized(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, 16, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_itc_logits_and_loss_stay_fp32_under_bf16_autocast():
    image, text, image_m, text_m = (normalized(6, seed) for seed in range(4))
    keys_image, keys_text = torch.cat([image_m, normalized(10, 5)]), torch.cat([text_m, normalized(10, 6)])
    positives = diagonal_positives(6, 16, 0, image.device)
    temperature = torch.tensor(0.07)
    expected = itc_loss(image, text, image_m, text_m, keys_image, keys_text, positives, temperature, 0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # bf16 inputs, as a bf16 model's projections give them.
        inputs = [tensor.bfloat16() for tensor in (image, text, image_m, text_m, keys_image, keys_text)]
        loss, logits_per_image, logits_per_text = itc_loss(*inputs, positives, temperature, 0.4)
        assert similarity_logits(inputs[0], inputs[5], temperature).dtype == torch.float32
    assert loss.dtype == logits_per_image.dtype == logits_per_text.dtype == torch.float32
    # Only the inputs' rounding to bf16 separates the two; in bf16 throughout the logits would be off by ~0.1.
    reference = similarity_logits(inputs[0].float(), inputs[5].float(), temperature)
    assert torch.equal(logits_per_image, reference)
    assert loss.item() == pytest.approx(expected[0].item(), abs=0.05)


def train_losses(steps: int, autocast: bool) -> list[dict[str, float]]:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    batches = [make_batch(seed=seed) for seed in range(5)]
    history = []
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outputs = model(**batches[step % len(batches)])
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model._momentum_update()
        history.append({name: outputs[name].item() for name in ("loss_itc", "loss_itm", "loss_lm")})
    return history


def test_fifty_bf16_steps_train_like_fp32():
    fp32, bf16 = train_losses(50, autocast=False), train_losses(50, autocast=True)
    assert all(math.isfinite(value) for entry in bf16 for value in entry.values())
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        first = fp32[0][name]
        # Both runs learn (the last ten steps' mean is lower than the first step) and stay within 10% of each other.
        fp32_end = sum(entry[name] for entry in fp32[-10:]) / 10
        bf16_end = sum(entry[name] for entry in bf16[-10:]) / 10
        assert bf16_end == pytest.approx(fp32_end, rel=0.10), name
        assert abs(bf16[0][name] - first) / first < 0.02, name
    assert sum(entry["loss_lm"] for entry in bf16[-10:]) / 10 < 0.8 * bf16[0]["loss_lm"]
