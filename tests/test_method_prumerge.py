"""Unit tests of PruMerge and PruMerge+ (tokprune/methods/prumerge.py) on small hand-made tensors.

The references recompute the quartiles, the key neighbours and the merged embeddings with Python loops
in float64, independently of the library's tensor code.
"""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_valid_keep

from tokprune.core.budget import AdaptiveBudget
from tokprune.errors import MethodOptionError
from tokprune.methods import REGISTRY, make_method
from tokprune.methods.base import ImageTokens
from tokprune.methods.prumerge import (
    PruMerge,
    PruMergePlus,
    code_count,
    iqr_outliers,
    nearest_neighbours,
    prumerge_adaptive_count,
    uniform_samples,
)

SPIKES = [5, 77, 300, 431]
# the default layer: the last ViT block, as in the authors' code (its q/k read the penultimate output)
ATT, KEYS = "cls_attention@-1", "vit_keys@-1"
# the readings these hand-made tests exercise: head-mean scores and keys, exactly k patches, no extra token;
# the defaults (the authors' code) are checked in tests/agreement/test_prumerge.py and below
FORMER = dict(score="heads", summary_token=False, merge="mean", merge_space="llm")


def former(cls, **options):
    """A PruMerge(+) with the former readings (FORMER), `options` on top."""
    return cls(**{**FORMER, **options})


def _image(n: int, d: int = 8, dk: int = 6, seed: int = 0, spikes=(), grid=None) -> ImageTokens:
    """Random embeddings and keys; softmax-like attention with a few large spikes."""
    g = torch.Generator().manual_seed(seed)
    attention = 1.0 + 0.1 * torch.rand(n, generator=g)
    for rank, i in enumerate(spikes):
        attention[i] = 20.0 + rank  # later spikes are higher
    attention = attention / attention.sum()
    return ImageTokens(
        embeds=torch.randn(n, d, generator=g),
        grid=grid,
        signals={ATT: attention, KEYS: torch.randn(n, dk, generator=g)},
    )


# ------------------------------------------------------------------------------------ reference


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), written out."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (pos - lo) * (s[hi] - s[lo])


def _ref_outliers(attention: torch.Tensor, factor: float = 1.5) -> set[int]:
    a = attention.double().tolist()
    q1, q3 = _percentile(a, 0.25), _percentile(a, 0.75)
    return {i for i, v in enumerate(a) if v > q3 + factor * (q3 - q1)}


def _ref_merged(image: ImageTokens, keep: list[int], neighbours: int, mode: str = "mean") -> torch.Tensor:
    """Per kept token: cosine of the keys to every other token, the top `neighbours`, then the stated
    attention-weighted mean (or the code's additive update), all in float64 loops."""
    keys = image.signals[KEYS].double().tolist()
    x = image.embeds.double()
    a = [max(0.0, v) for v in image.signals[ATT].double().tolist()]
    norm = [math.sqrt(sum(v * v for v in row)) for row in keys]
    out = []
    for i in keep:
        sims = [
            (sum(p * q for p, q in zip(keys[i], keys[j])) / (norm[i] * norm[j]), j)
            for j in range(len(keys))
            if j != i
        ]
        group = [j for _, j in sorted(sims, key=lambda t: (-t[0], t[1]))[:neighbours]]
        if mode == "add":
            out.append(x[i] + sum(a[j] * x[j] for j in group))
            continue
        members = [i, *group]
        total = sum(a[j] for j in members)
        if total > 0:
            out.append(sum(a[j] * x[j] for j in members) / total)
        else:
            out.append(sum(x[j] for j in members) / len(members))
    return torch.stack(out)


# ------------------------------------------------------------------------------------ IQR rule


def test_spikes_are_exactly_the_outliers():
    image = _image(576, spikes=SPIKES)
    outliers = iqr_outliers(image.signals[ATT])
    assert outliers.tolist() == SPIKES[::-1], "the spikes, highest attention first"
    assert prumerge_adaptive_count(image.signals[ATT]) == len(SPIKES)
    selection = former(PruMerge).select(image, len(SPIKES))
    assert selection.keep.tolist() == SPIKES


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("factor", [0.0, 0.5, 1.5, 3.0])
def test_outliers_match_loop_quartiles(seed, factor):
    g = torch.Generator().manual_seed(seed)
    attention = torch.softmax(3 * torch.randn(101 + seed, generator=g), 0)  # heavy upper tail
    outliers = iqr_outliers(attention, factor)
    assert set(outliers.tolist()) == _ref_outliers(attention, factor)
    values = attention[outliers]
    assert bool((values[:-1] >= values[1:]).all()), "ordered by attention, highest first"


def test_no_outliers_in_flat_attention():
    flat = torch.full((64,), 1 / 64)
    assert iqr_outliers(flat).numel() == 0
    assert prumerge_adaptive_count(flat) == 1
    assert iqr_outliers(torch.arange(20.0)).numel() == 0  # a uniform ramp has no outliers at 1.5 IQR


def test_default_budgets_are_the_codes_adaptive_count():
    for cls in (PruMerge, PruMergePlus):
        assert isinstance(cls.default_budget, AdaptiveBudget)
        assert str(cls.default_budget).startswith("adaptive")
    image = _image(576, spikes=SPIKES, seed=1)
    image.signals = {"cls_attention_concat@-1": image.signals[ATT], "vit_keys_concat@-1": image.signals[KEYS]}
    assert PruMerge().adaptive_count(image) == len(SPIKES) + 1  # the outliers and the extra token
    plus = PruMergePlus().adaptive_count(image)
    step = int(int(576 / len(SPIKES)) / 3)  # the code's int(int(1 / r) / 3)
    samples = {i for i in range(0, 575, step)} - set(SPIKES)
    assert plus == len(SPIKES) + len(samples) + 1


@pytest.mark.parametrize("m, n", [(32, 576), (7, 100), (3, 729), (13, 1000)])
def test_code_count_is_int_n_times_the_ratio(m, n):
    """The code counts int(N * (m / N)) in floating point, which can fall one below m."""
    attention = torch.full((n,), 1.0)
    attention[:m] = 100.0 + torch.arange(m, dtype=torch.float)
    assert code_count(attention) == int(n * (m / n))


def test_extra_token_is_the_attention_weighted_sum_of_the_dropped():
    n = 50
    image = _image(n, spikes=[3, 17, 40], seed=2)
    image.signals = {"cls_attention_concat@-1": image.signals[ATT], "vit_keys_concat@-1": image.signals[KEYS]}
    k = PruMerge().adaptive_count(image)
    selection = PruMerge().select(image, k)
    assert selection.keep.numel() == k == 4
    extra = selection.keep[selection.extra]
    assert extra.tolist() == [0]  # the first free slot
    patches = selection.keep[~selection.extra]
    assert set(patches.tolist()) == {3, 17, 40}
    a = image.signals["cls_attention_concat@-1"].double()
    dropped = [j for j in range(n) if j not in {3, 17, 40}]
    expected = sum(a[j] * image.embeds[j].double() for j in dropped)
    torch.testing.assert_close(selection.merged[selection.extra][0].double(), expected, atol=1e-5, rtol=1e-5)
    emitted = selection.keep[selection.order].tolist()
    order_of_patches = sorted([3, 17, 40], key=lambda i: -float(a[i]))
    assert emitted == order_of_patches + [0]  # by attention, then the extra token
    for row, i in zip(selection.merged[~selection.extra], patches.tolist()):  # the code's x_i + sum a_j x_j
        torch.testing.assert_close(
            row.double(), _ref_merged(image_with(image), [i], 32, "add")[0], atol=1e-5, rtol=1e-5
        )


def image_with(image: ImageTokens) -> ImageTokens:
    """The same image with its signals under the names `_ref_merged` reads."""
    return ImageTokens(
        image.embeds,
        image.grid,
        {ATT: image.signals["cls_attention_concat@-1"], KEYS: image.signals["vit_keys_concat@-1"]},
    )


# ------------------------------------------------------------------------------------ exact k


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 10, 32, 144, 575])
def test_base_truncates_or_tops_up_by_attention(k):
    image = _image(576, spikes=SPIKES, seed=1)
    keep = former(PruMerge).select(image, k).keep
    assert_valid_keep(keep, 576, k)
    a = image.signals[ATT]
    expected = sorted(sorted(range(576), key=lambda i: (-float(a[i]), i))[:k])
    assert keep.tolist() == expected
    if k >= len(SPIKES):
        assert set(SPIKES) <= set(keep.tolist())
    else:  # truncated: the highest spikes survive
        assert keep.tolist() == sorted(SPIKES[::-1][:k])


@pytest.mark.parametrize("k", [1, 3, 4, 5, 32, 144, 400, 575])
def test_plus_keeps_outliers_then_uniform_samples(k):
    image = _image(576, spikes=SPIKES, seed=2, grid=(24, 24))
    keep = former(PruMergePlus).select(image, k).keep
    assert_valid_keep(keep, 576, k)
    outliers = SPIKES[::-1][: min(k, len(SPIKES))]
    assert set(outliers) <= set(keep.tolist())
    rest = [i for i in range(576) if i not in SPIKES]
    m = k - len(outliers)
    samples = [rest[(2 * i + 1) * len(rest) // (2 * m)] for i in range(m)]
    assert keep.tolist() == sorted(outliers + samples)


def test_plus_samples_spread_over_the_grid():
    h = w = 24
    image = _image(h * w, spikes=SPIKES, seed=3, grid=(h, w))
    keep = former(PruMergePlus).select(image, 144).keep.tolist()
    samples = [i for i in keep if i not in SPIKES]
    assert len(samples) == 140
    # every 6 x 6 block of the grid holds some samples, and none holds more than twice its share
    counts = [
        sum(1 for i in samples if r <= i // w < r + 6 and c <= i % w < c + 6)
        for r in range(0, h, 6)
        for c in range(0, w, 6)
    ]
    assert min(counts) > 0 and max(counts) <= 2 * 140 / 16
    assert {i // w for i in samples} == set(range(h)), "every row is sampled"
    gaps = [b - a for a, b in zip(samples, samples[1:])]
    assert max(gaps) <= 6, "no long unsampled run of the raster order"


def test_uniform_samples_positions():
    candidates = torch.arange(12) * 2  # 0, 2, ..., 22
    assert uniform_samples(candidates, 3).tolist() == [4, 12, 20]  # positions 2, 6, 10
    assert uniform_samples(candidates, 12).tolist() == candidates.tolist()
    assert uniform_samples(candidates, 0).tolist() == []
    assert uniform_samples(candidates, 1).tolist() == [12]
    with pytest.raises(ValueError):
        uniform_samples(candidates, 13)


@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
@pytest.mark.parametrize("n,ks", [(2, [1]), (7, [1, 3, 6]), (50, [1, 9, 49]), (99, [1, 25, 98])])
def test_exactly_k_sorted_distinct(cls, n, ks):
    image = _image(n, seed=n)
    for k in ks:
        selection = former(cls).select(image, k)
        assert_valid_keep(selection.keep, n, k)
        assert selection.merged.shape == (k, image.embeds.shape[1])


def test_direct_calls_with_nothing_to_choose():
    image = _image(10)
    assert former(PruMerge).select(image, 10).keep.tolist() == list(range(10))
    assert former(PruMergePlus).select(image, 12).keep.tolist() == list(range(10))
    assert former(PruMerge).select(image, 10).merged is None


# ------------------------------------------------------------------------------------ merge


@pytest.mark.parametrize("cls", [PruMerge, PruMergePlus])
@pytest.mark.parametrize("mode", ["mean", "add"])
@pytest.mark.parametrize("neighbours", [1, 4, 32])
def test_merged_is_attention_weighted_mean_of_key_neighbours(cls, mode, neighbours):
    image = _image(120, seed=7, spikes=[3, 50, 99])
    selection = former(cls, neighbours=neighbours, merge=mode).select(image, 12)
    expected = _ref_merged(image, selection.keep.tolist(), neighbours, mode)
    assert selection.merged.dtype == image.embeds.dtype
    torch.testing.assert_close(selection.merged.double(), expected, atol=1e-5, rtol=1e-5)


def test_merge_on_hand_made_neighbours():
    # keys: tokens 0-2 point along e1, tokens 3-5 along e2; token 0 and 3 have the attention spikes
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    embeds = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [8.0, 0.0], [0.0, 8.0], [5.0, 5.0]])
    attention = torch.tensor([0.4, 0.1, 0.1, 0.2, 0.1, 0.1])
    image = ImageTokens(embeds, None, {ATT: attention, KEYS: keys})
    selection = former(PruMerge, neighbours=2).select(image, 2)
    assert selection.keep.tolist() == [0, 3]
    assert nearest_neighbours(keys, selection.keep, 2).tolist() == [[1, 2], [4, 5]]
    first = (0.4 * embeds[0] + 0.1 * embeds[1] + 0.1 * embeds[2]) / 0.6
    second = (0.2 * embeds[3] + 0.1 * embeds[4] + 0.1 * embeds[5]) / 0.4
    torch.testing.assert_close(selection.merged, torch.stack([first, second]))


def test_zero_attention_gives_plain_mean_and_all_neighbours_cap():
    image = _image(6, seed=4)
    image.signals[ATT] = torch.zeros(6)
    selection = former(PruMerge, neighbours=100).select(image, 2)  # more neighbours than tokens: all others
    expected = image.embeds.mean(0).expand(2, -1)
    torch.testing.assert_close(selection.merged, expected)


def test_no_neighbours_is_pure_pruning():
    image = _image(50, seed=5)
    selection = former(PruMerge, neighbours=0).select(image, 5)
    assert selection.merged is None
    assert selection.keep.tolist() == former(PruMerge).select(image, 5).keep.tolist()


def test_half_precision_inputs():
    image = _image(64, seed=6, spikes=[1, 2])
    half = ImageTokens(
        embeds=image.embeds.half(),
        grid=None,
        signals={name: value.half() for name, value in image.signals.items()},
    )
    for cls in (PruMerge, PruMergePlus):
        selection = former(cls).select(half, 16)
        assert_valid_keep(selection.keep, 64, 16)
        assert selection.merged.dtype == torch.float16 and torch.isfinite(selection.merged).all()


# ------------------------------------------------------------------------------------ layer


def test_signals_come_from_the_chosen_vision_layer():
    # the feature layer (-2 on LLaVA, plain names) and the last block (-1) disagree on the top token and
    # on the keys; the default reads the last block, as the authors' code, layer=None the feature layer
    n = 6
    embeds = torch.eye(n)
    last = torch.tensor([0.05, 0.05, 0.6, 0.1, 0.1, 0.1])
    feature = torch.tensor([0.6, 0.05, 0.05, 0.1, 0.1, 0.1])
    keys_last = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    keys_feature = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    signals = {"cls_attention": feature, "vit_keys": keys_feature, ATT: last, KEYS: keys_last}
    image = ImageTokens(embeds, None, signals)
    got = former(PruMerge, neighbours=1).select(image, 1)
    assert got.keep.tolist() == [2]
    # token 2's nearest key at the last block is token 1: (0.6 x_2 + 0.05 x_1) / 0.65
    torch.testing.assert_close(got.merged[0], (0.6 * embeds[2] + 0.05 * embeds[1]) / 0.65)
    got = former(PruMerge, neighbours=1, layer=None).select(image, 1)
    assert got.keep.tolist() == [0]
    torch.testing.assert_close(got.merged[0], (0.6 * embeds[0] + 0.05 * embeds[1]) / 0.65)
    plus = former(PruMergePlus, neighbours=0, layer=-1).select(image, 1)
    assert plus.keep.tolist() == [2]  # the IQR outlier of the last block's attention


# ------------------------------------------------------------------------------------ options


def test_registry_and_metadata():
    assert REGISTRY["prumerge"] is PruMerge and REGISTRY["prumerge_plus"] is PruMergePlus
    for cls in (PruMerge, PruMergePlus):
        assert cls.where == "pre" and cls().signals == ("cls_attention_concat@-1", "vit_keys_concat@-1")
        assert cls(score="heads").signals == (ATT, KEYS)
        assert cls(layer=None, score="heads").signals == ("cls_attention", "vit_keys")  # the feature layer
        assert cls(layer=-2).signals == ("cls_attention_concat@-2", "vit_keys_concat@-2")
        assert "2403.15388" in cls.paper and cls.code_families == ("llava",)
        assert cls().features == "vision" and cls(merge_space="llm").features == "llm"
    method = PruMergePlus()
    assert (method.neighbours, method.merge, method.iqr_factor, method.layer) == (32, "add", 1.5, -1)
    assert (method.score, method.summary_token, method.merge_space) == ("concat", True, "vision")


@pytest.mark.parametrize(
    "cls,bad",
    [
        (PruMerge, {"neighbours": -1}),
        (PruMerge, {"neighbours": 2.5}),
        (PruMerge, {"neighbours": True}),
        (PruMerge, {"merge": "max"}),
        (PruMergePlus, {"merge": "sum"}),
        (PruMergePlus, {"iqr_factor": -0.5}),
        (PruMergePlus, {"iqr_factor": "1.5"}),
        (PruMergePlus, {"iqr_factor": float("nan")}),
        (PruMerge, {"layer": 1.5}),
        (PruMerge, {"layer": True}),
        (PruMergePlus, {"layer": "last"}),
    ],
)
def test_bad_options_raise(cls, bad):
    with pytest.raises(MethodOptionError):
        cls(**bad)


def test_unknown_options_raise_through_the_registry():
    with pytest.raises(MethodOptionError):
        make_method("prumerge", {"plus": True})
    assert make_method("prumerge", {"iqr_factor": 2.0}).iqr_factor == 2.0  # the adaptive count's fence
    for bad in ({"score": "mean"}, {"merge_space": "vit"}, {"summary_token": 1}):
        with pytest.raises(MethodOptionError, match="must be"):
            make_method("prumerge", bad)
