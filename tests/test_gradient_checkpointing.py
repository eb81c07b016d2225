"""Training through a pruned model with gradient checkpointing: the loss and every gradient equal those
without checkpointing (checkpointed layers re-run their forward in backward; tokprune's signal hooks inside
them compute nothing for autograd, and its layer hooks stay outside the checkpointed forward)."""

import pytest
import torch
from test_invariants import TINY_OPTIONS
from tiny_models import BUILDERS, batch_inputs

import tokprune

# every in-LLM method (scored in the layer before the boundary or at it, merging or not), and pre-LLM ones
METHODS = ["fastv", "pdrop", "dart", "sparsevlm", "mustdrop", "visiondrop", "visionzip", "divprune"]


@pytest.fixture(scope="module")
def training_llava():
    model, proc = BUILDERS["llava"]("sdpa")
    return model.train(), batch_inputs("llava", proc)


def _loss_and_grads(model, inputs: dict, method: str, checkpointing: bool):
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.zero_grad()
    with tokprune.apply(model, method, keep_ratio=0.25, **TINY_OPTIONS.get(method, {})) as pruner:
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return loss.detach(), grads, pruner.stats.visual_kept


@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(training_llava, method):
    model, inputs = training_llava
    loss, grads, kept = _loss_and_grads(model, inputs, method, checkpointing=False)
    checkpointed_loss, checkpointed_grads, checkpointed_kept = _loss_and_grads(model, inputs, method, True)
    model.gradient_checkpointing_disable()
    assert kept == checkpointed_kept and kept[0] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert len(grads) == len(checkpointed_grads) > 0
    for a, b in zip(checkpointed_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
