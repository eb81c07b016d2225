"""Assertions shared by the method tests."""

import pytest
import torch
from tokprune.patches import adapter_for

from tokprune.methods import REGISTRY


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
