"""Assertions shared by the method tests."""

import torch


def assert_valid_keep(keep: torch.Tensor, n: int, k: int) -> None:
    """keep is k sorted, distinct, in-range LongTensor indices of n tokens."""
    assert keep.dtype == torch.long
    assert keep.shape == (k,)
    values = keep.tolist()
    assert values == sorted(set(values)), "indices must be sorted and distinct"
    assert all(0 <= v < n for v in values)
