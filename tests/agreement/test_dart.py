"""DART against its authors' code (tests/agreement/ref_dart.py): the kept image tokens and the prefill logits
of the code's forward (stepwise, eager) against tokprune's (sdpa, with a cache), LLaVA-1.5 shapes, K = 2.

The code visits its pivots in the iteration order of a Python set of their sequence indices; tokprune's
default reads those indices from the engine's "position" signal, which the engine does not give yet
(`DART`, difference 1). `with_positions` stands in for it here: it hands `select` every token's index in
the row, what the signal is to hold."""

from __future__ import annotations

import pytest
import torch

from agreement.harness import agreement_llava, jaccard, llava_case, relative_error, run_tokprune
from agreement.llm_steps import plain_inputs, stepwise_logits
from agreement.ref_dart import dart_step
from tokprune.methods.dart import DART


@pytest.fixture(scope="module")
def llava():
    return agreement_llava()


def image_span(case) -> tuple[int, int]:
    visual = case.visual[0].nonzero().squeeze(1)
    return int(visual[0]), visual.numel()


def reference(case, budget: int, layer: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(the code's kept image tokens as patch indices, sorted; its prefill logits (1, L', V))."""
    start, n = image_span(case)
    found: dict = {}
    step = dart_step(case.model.model.language_model, layer, start, n, budget, found)
    logits, _ = stepwise_logits(case.model, *plain_inputs(case), step)
    return torch.tensor(found["kept"]) - start, logits


@pytest.fixture
def with_positions(monkeypatch):
    """Give DART's `select` the "position" signal (sequence index of every image and text token) of a
    one-image case, as the engine is to."""

    def install(case):
        start, n = image_span(case)
        length = case.visual.shape[1]
        original = DART.select

        def select(self, image, k):
            image.signals["position"] = torch.arange(start, start + n)
            image.text["position"] = torch.arange(start + n, length)
            return original(self, image, k)

        monkeypatch.setattr(DART, "select", select)

    return install


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_kept_tokens_and_logits_equal_the_code(llava, with_positions, seed, budget):
    case = llava_case(seed=seed, model_and_processor=llava)
    expected, logits = reference(case, budget)
    with_positions(case)
    run = run_tokprune(case, "dart", budget=budget)
    assert run.kept[0].numel() == 4 + 8 * (budget // 8)  # the code's count: pivots on top of the budget
    assert run.kept[0].tolist() == expected.tolist()
    assert relative_error(run.logits, logits) < 1e-5


def test_other_layer_and_uneven_budget(llava, with_positions):
    case = llava_case(seed=5, model_and_processor=llava)
    expected, logits = reference(case, 100, layer=1)
    with_positions(case)
    run = run_tokprune(case, "dart", budget=100, layer=1)
    assert run.kept[0].numel() == 4 + 96
    assert run.kept[0].tolist() == expected.tolist()
    assert relative_error(run.logits, logits) < 1e-5


def test_the_visit_order_matters(llava):
    """Without positions the pivots take their shares by key norm (pivot_order="norm"): another kept set."""
    case = llava_case(seed=0, model_and_processor=llava)
    expected, _ = reference(case, 128)
    run = run_tokprune(case, "dart", budget=128, pivot_order="norm")
    assert run.kept[0].numel() == expected.numel()
    assert jaccard(run.kept[0], expected) < 0.95


def test_exact_quota_keeps_the_budget(llava):
    case = llava_case(seed=1, model_and_processor=llava)
    run = run_tokprune(case, "dart", budget=128, quota="exact")
    assert run.kept[0].numel() == 128


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_without_help_equals_the_code(llava, seed):
    """The engine's "position" signal gives the pivots the code's set order: the default equals the code."""
    case = llava_case(seed=seed, model_and_processor=llava)
    expected, _ = reference(case, 128)
    run = run_tokprune(case, "dart", budget=128)
    assert run.kept[0].tolist() == expected.tolist()
