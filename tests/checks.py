"""Assertions shared by the method tests."""

import pytest
import torch
from tokprune.patches import adapter_for

from tokprune.core.budget import Budget
from tokprune.methods import REGISTRY, LLMMethod, make_method
from tokprune.methods.base import CompositeMethod


def assert_valid_keep(keep: torch.Tensor, n: int, k: int) -> None:
    """keep is k sorted, distinct, in-range LongTensor indices of n tokens."""
    assert keep.dtype == torch.long
    assert keep.shape == (k,)
    values = keep.tolist()
    assert values == sorted(set(values)), "indices must be sorted and distinct"
    assert all(0 <= v < n for v in values)


def assert_same_run(got: tuple, expected: tuple, tol: float) -> None:
    """Two runs of one pruned batch agree: got / expected = (last-position prefill logits (B, V), generated
    tokens (B, n), per-step logits [(B, V)] * n). Logits within tol x the largest first-step |logit|."""
    prefill, tokens, steps = got
    expected_prefill, expected_tokens, expected_steps = expected
    scale = max(1.0, float(expected_steps[0].abs().max()))
    torch.testing.assert_close(prefill, expected_prefill, atol=tol * scale, rtol=0)
    assert torch.equal(tokens, expected_tokens)
    for a, b in zip(steps, expected_steps):
        torch.testing.assert_close(a, b, atol=tol * scale, rtol=0)


def skip_without_tiles(model, method: str) -> None:
    """Skip an AnyRes-only method (`needs_tiles`) on a model without tiles (the refusal itself is tested in
    test_invariants)."""
    if REGISTRY[method].needs_tiles and not adapter_for(model).tiles:
        pytest.skip("needs AnyRes tiles (refusal tested in test_invariants)")


def final_count(method: str, options: dict, budget, n: int) -> int:
    """Visual tokens an image of n content tokens keeps at the method's last stage under `budget`."""
    made = make_method(method, options)
    last = made.parts()[-1] if isinstance(made, CompositeMethod) else made
    if isinstance(last, LLMMethod):
        return min(n, last.stage_counts(n, _as_budget(budget))[-1])
    return _as_budget(budget).kept(n)


def _as_budget(budget) -> Budget:
    """A Budget from a token count (int) or a Budget."""
    return budget if isinstance(budget, Budget) else Budget(tokens=budget)
