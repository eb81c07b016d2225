"""Unit tests of ToMe (tokprune/methods/tome.py) on small tensors.

The reference below re-implements the matching with Python lists of explicit groups (original token
indices) in float64: a group's key is the plain mean of its members' keys and its embedding the plain
mean of its members' embeddings, with no sums or sizes, independently of the library's bookkeeping.
A round merges at most floor(t / 2) of its t tokens (ToMe's cap); the next round runs on the survivors
in raster order or, for round_order "tome", in ToMe's output order [unmerged A, B].
"""

from __future__ import annotations

import pytest
import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens
from tokprune.methods.tome import ToMe, bipartite_merge


def _ref_groups(
    keys: torch.Tensor, k: int, round_order: str = "raster"
) -> tuple[list[int], list[list[int]], list[int]]:
    """(surviving original indices, ascending; the sorted group of original indices of each survivor;
    the survivors in the last round's output order)."""
    keys = keys.double()
    groups = [[i] for i in range(keys.shape[0])]
    reps = list(range(keys.shape[0]))  # surviving original index of each current token, ascending

    def unit(group):
        v = keys[group].mean(0)
        return v / v.norm()

    while len(reps) > k:
        a, b = reps[0::2], reps[1::2]
        ua = {i: unit(groups[i]) for i in a}
        ub = {j: unit(groups[j]) for j in b}
        matches = []
        for pos, i in enumerate(a):
            sims = [float(ua[i] @ ub[j]) for j in b]
            best = max(sims)
            matches.append((-best, pos, i, b[sims.index(best)]))
        r = min(len(reps) - k, len(reps) // 2)
        ranked = sorted(matches)
        for _, _, i, j in ranked[:r]:
            groups[j] += groups[i]
            groups[i] = []
        reps = [i for _, _, i, _ in ranked[r:]] + b  # ToMe's output order
        if round_order == "raster":
            reps = sorted(reps)
    survivors = sorted(reps)
    return survivors, [sorted(groups[i]) for i in survivors], reps


def _check(keep, merged, group, embeds, n, k):
    assert keep.dtype == torch.long and keep.shape == (k,)
    values = keep.tolist()
    assert values == sorted(set(values)), "survivors must be sorted and distinct"
    assert merged.shape == (k, embeds.shape[1])
    # the groups partition all n tokens, each survivor is in its own group
    assert set(group.tolist()) == set(values)
    for s in values:
        assert int(group[s]) == s
    assert sum(int((group == s).sum()) for s in values) == n
    # each survivor's embedding is the plain mean of the original tokens in its group
    for i, s in enumerate(values):
        members = (group == s).nonzero().squeeze(1)
        torch.testing.assert_close(merged[i], embeds[members].float().mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("n", "k", "seed"),
    [(7, 3, 0), (20, 1, 1), (20, 9, 2), (33, 5, 3), (64, 16, 4), (64, 63, 5), (169, 64, 6), (27, 26, 7)],
)
@pytest.mark.parametrize("round_order", ["raster", "tome"])
def test_matches_reference(n, k, seed, round_order):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, 6, generator=g)
    embeds = torch.randn(n, 5, generator=g)
    keep, merged, group, sequence = bipartite_merge(keys, embeds, k, round_order)
    _check(keep, merged, group, embeds, n, k)
    ref_keep, ref_groups, ref_sequence = _ref_groups(keys, k, round_order)
    assert keep.tolist() == ref_keep
    assert sequence.tolist() == ref_sequence
    for i, members in enumerate(ref_groups):
        assert sorted((group == keep[i]).nonzero().squeeze(1).tolist()) == members
        torch.testing.assert_close(merged[i], embeds[members].mean(0), atol=1e-5, rtol=1e-5)


def test_clear_pairs_merge_into_b_tokens():
    # tokens 2i and 2i+1 are near-identical, pairs are orthogonal: one round merges each pair
    base = torch.eye(8)[:4] * 3.0
    keys = base.repeat_interleave(2, dim=0) + 0.01 * torch.randn(
        8, 8, generator=torch.Generator().manual_seed(0)
    )
    embeds = torch.arange(8 * 3, dtype=torch.float).view(8, 3)
    keep, merged, group, _ = bipartite_merge(keys, embeds, 4)
    assert keep.tolist() == [1, 3, 5, 7]  # the B token of every pair keeps its own index
    assert group.tolist() == [1, 1, 3, 3, 5, 5, 7, 7]
    torch.testing.assert_close(merged, embeds.view(4, 2, 3).mean(1))


def test_most_similar_pairs_merge_first():
    # same layout, but pairs differ in how similar their two tokens are: the 2 tightest pairs merge
    g = torch.Generator().manual_seed(1)
    noise = torch.tensor([0.5, 0.01, 0.3, 0.02])  # pair 1 and pair 3 are the tightest
    base = torch.eye(8)[:4]
    keys = base.repeat_interleave(2, dim=0)
    keys[1::2] += noise[:, None] * torch.randn(4, 8, generator=g)
    embeds = torch.randn(8, 4, generator=g)
    keep, merged, group, _ = bipartite_merge(keys, embeds, 6)
    assert keep.tolist() == [0, 1, 3, 4, 5, 7]
    assert group.tolist() == [0, 1, 3, 3, 4, 5, 7, 7]
    torch.testing.assert_close(merged[2], embeds[2:4].mean(0))
    torch.testing.assert_close(merged[5], embeds[6:8].mean(0))
    torch.testing.assert_close(merged[[0, 1, 3, 4]], embeds[[0, 1, 4, 5]])


def test_duplicates_merge_first():
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(16, 32, generator=g)
    keys[5] = 2.0 * keys[2]  # A token 2 and B token 5: cosine 1
    keys[9] = keys[12]  # A token 12 and B token 9: cosine 1
    embeds = torch.randn(16, 4, generator=g)
    keep, merged, group, _ = bipartite_merge(keys, embeds, 14)
    assert keep.tolist() == [i for i in range(16) if i not in (2, 12)]
    assert int(group[2]) == 5 and int(group[12]) == 9
    torch.testing.assert_close(merged[keep.tolist().index(5)], (embeds[2] + embeds[5]) / 2)
    torch.testing.assert_close(merged[keep.tolist().index(9)], (embeds[9] + embeds[12]) / 2)


def test_sizes_weight_later_rounds():
    # round 1: A = {0, 2}, B = {1, 3}; tokens 0, 1, 2 share a direction, so both A tokens join 1.
    # round 2: A = {1 (size 3)}, B = {3}: the result is the mean of all 4 tokens, not of the 2 means.
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [0.0, 1.0]])
    embeds = torch.tensor([[0.0], [3.0], [6.0], [30.0]])
    keep, merged, group, _ = bipartite_merge(keys, embeds, 1)
    assert keep.tolist() == [3]
    assert group.tolist() == [3, 3, 3, 3]
    torch.testing.assert_close(merged, torch.tensor([[9.75]]))  # (0 + 3 + 6 + 30) / 4, not 16.5


def test_odd_counts_merge_at_most_half():
    # 3 tokens: ToMe's cap lets one round merge floor(3 / 2) = 1 (the old ceil(3 / 2) = 2 merged both A
    # tokens at once). Token 0 is close to 1, token 2 far: round 1 merges 0 into 1, 2 stays unmerged.
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]])
    embeds = torch.tensor([[0.0], [3.0], [9.0]])
    # raster: round 2 on [1, 2] merges A = 1 into B = 2
    keep, merged, group, sequence = bipartite_merge(keys, embeds, 1)
    assert keep.tolist() == [2] and group.tolist() == [2, 2, 2] and sequence.tolist() == [2]
    torch.testing.assert_close(merged, torch.tensor([[4.0]]))
    # ToMe's order: round 2 on [2 (unmerged A), 1 (B)] merges 2 into 1
    keep, merged, group, _ = bipartite_merge(keys, embeds, 1, "tome")
    assert keep.tolist() == [1] and group.tolist() == [1, 1, 1]
    torch.testing.assert_close(merged, torch.tensor([[4.0]]))


def test_tome_order_is_the_selection_order():
    g = torch.Generator().manual_seed(8)
    keys, embeds = torch.randn(27, 4, generator=g), torch.randn(27, 3, generator=g)
    image = ImageTokens(embeds=embeds, grid=None, signals={"vit_keys": keys})
    selection = ToMe(round_order="tome").select(image, 10)
    keep, merged, _, sequence = bipartite_merge(keys, embeds, 10, "tome")
    assert torch.equal(selection.keep, keep)
    assert torch.equal(selection.keep[selection.order], sequence)
    assert sorted(selection.order.tolist()) == list(range(10))
    assert ToMe().select(image, 10).order is None


@pytest.mark.parametrize("value", ["ToMe", "sorted", None, 1])
def test_bad_round_order_is_refused(value):
    from tokprune.errors import MethodOptionError

    with pytest.raises(MethodOptionError, match="round_order"):
        ToMe(round_order=value)


def test_select_uses_keys_else_embeddings():
    g = torch.Generator().manual_seed(3)
    n, k = 24, 6
    embeds = torch.randn(n, 8, generator=g, dtype=torch.float64).to(torch.bfloat16)
    keys = torch.randn(n, 4, generator=g)
    with_keys = ToMe().select(ImageTokens(embeds=embeds, grid=(4, 6), signals={"vit_keys": keys}), k)
    ref_keep, ref_merged, *_ = bipartite_merge(keys, embeds, k)
    assert torch.equal(with_keys.keep, ref_keep)
    assert with_keys.merged.dtype == torch.bfloat16
    torch.testing.assert_close(with_keys.merged, ref_merged.to(torch.bfloat16))
    without = ToMe().select(ImageTokens(embeds=embeds, grid=(4, 6)), k)
    assert torch.equal(without.keep, bipartite_merge(embeds, embeds, k)[0])


def test_nothing_to_merge_passes_through():
    embeds = torch.randn(5, 3)
    selection = ToMe().select(ImageTokens(embeds=embeds, grid=None, signals={"vit_keys": embeds}), 5)
    assert selection.keep.tolist() == [0, 1, 2, 3, 4] and selection.merged is None
    with pytest.raises(ValueError):
        bipartite_merge(embeds, embeds, 5)


def test_schedule_576_to_64():
    g = torch.Generator().manual_seed(4)
    keys, embeds = torch.randn(576, 16, generator=g), torch.randn(576, 8, generator=g)
    keep, merged, group, _ = bipartite_merge(keys, embeds, 64)
    _check(keep, merged, group, embeds, 576, 64)


def test_class_attributes():
    assert ToMe.name == "tome" and ToMe.where == "pre"
    assert ToMe.signals == ("vit_keys",)
    assert ToMe.default_budget == Budget(tokens=64)
