"""`torch.compile` of the pretraining model: two optimizer steps of the tiny model, compiled, give the losses,
gradients, weights and queues of eager execution.

The backend is `aot_eager`: TorchDynamo captures the graphs and AOTAutograd traces their backward, as under the
default backend, but the graphs run as ATen ops instead of inductor's generated C++, which on this CPU would take
minutes to build for the many graphs BLIP's three text modes give (docs/pretraining.md has the figures)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from transformers_blip.modeling_pretraining import BlipForPreTraining

STEPS = 2
# Compiled graphs may reorder float operations: each value within 1e-6, absolute or relative (the temperature's
# gradient, a sum over every logit of ITC, is about 5, where 1e-6 absolute is two ulps).
TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def batch(step: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    input_ids = torch.randint(104, 126, (4, 8), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # one padded caption, so the masked attention path is compiled too
    return {
        "pixel_values": torch.randn(4, 3, 32, 32, generator=generator),
        "input_ids": input_ids.masked_fill(attention_mask == 0, 0),
        "attention_mask": attention_mask,
    }


def train(compiled: bool) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], BlipForPreTraining]:
    """STEPS steps of AdamW and the momentum update; the losses, the gradients of each step and the model."""
    torch.manual_seed(0)
    model = BlipForPreTraining(make_config(queue_size=8, momentum=0.9)).train()
    forward = torch.compile(model, backend="aot_eager", fullgraph=False) if compiled else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, gradients = [], []
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the same hard negatives in both runs
        loss = forward(**batch(step)).loss
        loss.backward()
        losses.append(loss.detach())
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        optimizer.step()
        optimizer.zero_grad()
        model._momentum_update()
    return losses, gradients, model


@pytest.fixture(scope="module")
def runs():
    torch._dynamo.reset()
    yield train(compiled=False), train(compiled=True)
    torch._dynamo.reset()


def test_compiled_losses_and_gradients_match_eager(runs):
    (eager_losses, eager_grads, _), (compiled_losses, compiled_grads, _) = runs
    for step in range(STEPS):
        torch.testing.assert_close(compiled_losses[step], eager_losses[step], **TOLERANCE)
        assert compiled_grads[step].keys() == eager_grads[step].keys() and len(eager_grads[step]) > 100
        for name, grad in eager_grads[step].items():
            torch.testing.assert_close(compiled_grads[step][name], grad, **TOLERANCE, msg=name)


def test_compiled_training_ends_with_the_weights_and_queues_of_eager(runs):
    (*_, eager_model), (*_, compiled_model) = runs
    compiled_state = compiled_model.state_dict()
    for name, tensor in eager_model.state_dict().items():  # weights, momentum copies, queues, pointer
        torch.testing.assert_close(compiled_state[name], tensor, **TOLERANCE, msg=name)
    assert int(compiled_model.queue_ptr) == (STEPS * 4) % 8
