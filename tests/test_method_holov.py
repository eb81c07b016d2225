"""Unit tests of HoloV (tokprune/methods/holov.py) on small random tensors.

The defaults follow the authors' code (raster bands, attention ranking, floored shares); tokprune's former
defaults are options (`FORMER`). The references below recompute both with Python loops in float64; the
water-filling split is solved by bisection on the water level, independently of the library's iterative
saturation. Agreement with the authors' code on real model classes: tests/agreement/test_holov.py.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from checks import assert_valid_keep

import tokprune
from tokprune.core.budget import Budget
from tokprune.core.layout import Unit
from tokprune.core.selection import select_units
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens
from tokprune.methods.holov import (
    HoloV,
    allocate_quotas,
    code_quotas,
    code_scores,
    crop_count_for,
    crop_layout,
    crop_partition,
    holistic_scores,
)

# tokprune's former defaults: 2-D blocks, ranking by the holistic score, variance over j != i, water filling
FORMER = dict(layout="blocks", rank_by="score", scoring="centred", allocation="water_fill", units="per_unit")


def _image(h: int, w: int, d: int = 8, seed: int = 0, grid: bool = True) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    n = h * w
    embeds = torch.randn(n, d, generator=g)
    attention = torch.rand(n, generator=g) ** 3  # skewed, non-negative, like a softmax row
    attention = attention / attention.sum()
    return ImageTokens(embeds=embeds, grid=(h, w) if grid else None, signals={"cls_attention": attention})


# ------------------------------------------------------------------------------------ reference


def _ref_crops(h: int, w: int, rows: int, cols: int) -> list[list[int]]:
    """Crop of every token by explicit band membership (same band rule, written as loops)."""
    r, c = crop_layout(h, w, rows, cols)
    row_band = [max(i for i in range(r) if i * h // r <= y) for y in range(h)]
    col_band = [max(j for j in range(c) if j * w // c <= x) for x in range(w)]
    crops: list[list[int]] = [[] for _ in range(r * c)]
    for y in range(h):
        for x in range(w):
            crops[row_band[y] * c + col_band[x]].append(y * w + x)
    return crops


def _ref_scores(embeds, attention, crops, alpha=1.0, beta=0.09, eps=1e-6):
    f = embeds.double().tolist()
    a = attention.double().tolist()
    norm = [math.sqrt(sum(v * v for v in row)) for row in f]
    scores = [0.0] * len(a)
    crop_scores = []
    for crop in crops:
        m = len(crop)
        if m == 1:
            scores[crop[0]] = alpha * a[crop[0]]
            crop_scores.append(scores[crop[0]])
            continue
        var = {}
        for i in crop:
            sims = [
                sum(p * q for p, q in zip(f[i], f[j])) / ((norm[i] + eps) * (norm[j] + eps))
                for j in crop
                if j != i
            ]
            mu = sum(sims) / (m - 1)
            var[i] = sum((s - mu) ** 2 for s in sims) / (m - 1)
        lam = (sum(abs(a[i]) for i in crop) / m) / (sum(abs(var[i]) for i in crop) / m + eps)
        for i in crop:
            scores[i] = alpha * a[i] + beta * lam * var[i]
        crop_scores.append(sum(scores[i] for i in crop) / m)
    return scores, crop_scores


def _water_level(weights, sizes, k):
    """Real shares min(size_c, t w_c) with sum k, t found by bisection."""
    lo, hi = 0.0, 1.0
    while sum(min(s, hi * w) for s, w in zip(sizes, weights)) < k:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(s, mid * w) for s, w in zip(sizes, weights)) < k:
            lo = mid
        else:
            hi = mid
    return [min(s, hi * w) for s, w in zip(sizes, weights)]


def _ref_quotas(weights, sizes, k):
    """Positive-weight crops by water level; if they cannot hold k, they are full and the zero-weight
    crops share the rest by size; then largest remainder."""
    capacity = sum(s for s, w in zip(sizes, weights) if w > 0)
    if capacity >= k:
        ideal = _water_level(weights, sizes, k)
    else:
        rest = _water_level([0.0 if w > 0 else float(s) for s, w in zip(sizes, weights)], sizes, k - capacity)
        ideal = [float(s) if w > 0 else x for s, w, x in zip(sizes, weights, rest)]
    quota = [s if x >= s - 1e-9 else math.floor(x) for s, x in zip(sizes, ideal)]
    fractions = sorted(
        (-(x - math.floor(x)), -w, c)
        for c, (s, x, w) in enumerate(zip(sizes, ideal, weights))
        if quota[c] < s
    )
    for _, _, c in fractions[: k - sum(quota)]:
        quota[c] += 1
    return quota


def _ref_select(image: ImageTokens, k: int, rows=4, cols=4, beta=0.09) -> list[int]:
    h, w = image.grid
    crops = _ref_crops(h, w, rows, cols)
    scores, crop_scores = _ref_scores(image.embeds, image.signals["cls_attention"], crops, beta=beta)
    quotas = _ref_quotas([max(s, 0.0) for s in crop_scores], [len(c) for c in crops], k)
    keep = []
    for crop, q in zip(crops, quotas):
        keep += sorted(crop, key=lambda i: (-scores[i], i))[:q]
    return sorted(keep)


# ------------------------------------------------------------------------------------ crops


@pytest.mark.parametrize(
    "h,w", [(24, 24), (7, 7), (4, 4), (3, 3), (5, 9), (1, 50), (50, 1), (2, 100), (100, 2), (1, 5), (27, 13)]
)
@pytest.mark.parametrize("layout", ["blocks", "bands"])
def test_crops_partition_the_grid(h, w, layout):
    crops = crop_partition(h, w, 4, 4, layout)
    flat = torch.cat(crops).tolist()
    assert sorted(flat) == list(range(h * w)), "every token in exactly one crop"
    assert all(c.numel() > 0 for c in crops)
    assert len(crops) <= 16
    if layout == "bands" or min(h, w) >= 4:
        assert len(crops) == min(16, h * w)


@pytest.mark.parametrize("h,w", [(24, 24), (7, 7), (5, 9), (27, 13)])
def test_block_crops_are_near_equal_rectangles(h, w):
    crops = crop_partition(h, w)
    assert [c.tolist() for c in crops] == _ref_crops(h, w, 4, 4)
    heights, widths = set(), set()
    for c in crops:
        ys, xs = sorted({i // w for i in c.tolist()}), sorted({i % w for i in c.tolist()})
        assert ys == list(range(ys[0], ys[-1] + 1)) and xs == list(range(xs[0], xs[-1] + 1))
        assert c.numel() == len(ys) * len(xs), "a crop is a full rectangle"
        heights.add(len(ys))
        widths.add(len(xs))
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1


@pytest.mark.parametrize(
    "n,sizes",
    [
        (576, [36] * 16),
        (49, [4] + [3] * 15),
        (20, [2] * 4 + [1] * 12),
        (35, [3] * 3 + [2] * 13),
        (5, [1] * 5),
    ],
)
def test_band_crops_split_like_the_authors_code(n, sizes):
    # the authors' code: n // 16 tokens per run, the first n % 16 runs one longer, runs in raster order
    crops = crop_partition(1, n, 4, 4, "bands")
    assert [c.numel() for c in crops] == sizes
    start = 0
    for c, size in zip(crops, sizes):
        assert c.tolist() == list(range(start, start + size))
        start += size
    # the layout only depends on the token count, not on the grid's shape
    assert [c.tolist() for c in crop_partition(7, 7, 4, 4, "bands")] == [
        c.tolist() for c in crop_partition(1, 49, 4, 4, "bands")
    ]


def test_crop_layout_keeps_sixteen_crops_on_thin_grids():
    assert crop_layout(24, 24, 4, 4) == (4, 4)
    assert crop_layout(1, 100, 4, 4) == (1, 16)
    assert crop_layout(100, 1, 4, 4) == (16, 1)
    assert crop_layout(2, 100, 4, 4) == (2, 8)
    assert crop_layout(3, 3, 4, 4) == (3, 3)


# ------------------------------------------------------------------------------------ quotas


@pytest.mark.parametrize("seed", range(40))
def test_quotas_sum_to_k_capped_and_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n_crops = int(torch.randint(1, 20, (1,), generator=g))
    sizes = torch.randint(1, 12, (n_crops,), generator=g).tolist()
    weights = (torch.rand(n_crops, generator=g) ** 4).tolist()
    if seed % 5 == 0:
        weights[0] = 0.0
    for k in range(1, sum(sizes)):
        quota = allocate_quotas(weights, sizes, k)
        assert sum(quota) == k
        assert all(0 <= q <= s for q, s in zip(quota, sizes))
        assert quota == _ref_quotas(weights, sizes, k), (k, sizes, weights)


def test_quotas_proportional_when_nothing_saturates():
    assert allocate_quotas([1.0, 1.0, 2.0], [10, 10, 10], 8) == [2, 2, 4]
    # largest remainder: ideal 2.5, 2.5, 5.0 -> tie on the remainder, lower index wins
    assert allocate_quotas([1.0, 1.0, 2.0], [10, 10, 10], 10) == [3, 2, 5]
    # fewer tokens than crops: the largest shares get one each
    assert allocate_quotas([0.1, 0.5, 0.3, 0.1], [5, 5, 5, 5], 2) == [0, 1, 1, 0]


def test_quotas_overflow_is_reshared():
    # the heavy crop holds only 3 tokens; its excess goes to the others by weight
    assert allocate_quotas([100.0, 1.0, 3.0], [3, 10, 10], 11) == [3, 2, 6]
    # zero weights everywhere: shared by size
    assert allocate_quotas([0.0, 0.0], [3, 9], 4) == [1, 3]
    # a crop with all the weight takes everything it can; the rest is shared by size
    assert allocate_quotas([1.0, 0.0, 0.0], [4, 6, 2], 7) == [4, 2, 1]


# ------------------------------------------------------------------------------------ scores


def test_token_scores_match_loop_reference():
    image = _image(7, 9, seed=3)
    crops = crop_partition(7, 9)
    scores, crop_scores = holistic_scores(image.embeds, image.signals["cls_attention"], crops)
    ref_scores, ref_crop_scores = _ref_scores(
        image.embeds, image.signals["cls_attention"], [c.tolist() for c in crops]
    )
    assert scores.dtype == torch.float32
    torch.testing.assert_close(
        scores.double(), torch.tensor(ref_scores, dtype=torch.float64), rtol=1e-5, atol=1e-9
    )
    torch.testing.assert_close(
        crop_scores.double(), torch.tensor(ref_crop_scores, dtype=torch.float64), rtol=1e-5, atol=1e-9
    )


def test_crop_score_is_scaled_mean_attention():
    image = _image(8, 8, seed=1)
    crops = crop_partition(8, 8)
    attention = image.signals["cls_attention"]
    _, crop_scores = holistic_scores(image.embeds, attention, crops, beta=0.09)
    expected = torch.stack([attention[c].mean() * 1.09 for c in crops])
    torch.testing.assert_close(crop_scores, expected, rtol=1e-4, atol=0.0)


def test_hand_made_crop_where_diversity_beats_attention():
    # one crop of three tokens: 0 and 1 are orthogonal, 2 lies between them (cosine 1/sqrt(2) to both)
    embeds = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    attention = torch.tensor([0.30, 0.30, 0.31])
    crops = [torch.arange(3)]
    scores, crop_scores = holistic_scores(embeds, attention, crops, alpha=1.0, beta=0.09, eps=0.0)
    # similarities to the others: token 0 -> {0, r}, token 1 -> {0, r}, token 2 -> {r, r}, r = 1/sqrt(2)
    # variances over j != i: (r/2)^2 = 1/8, 1/8, 0; lambda = mean(a) / mean(v) = 0.91/3 / (1/12) = 3.64
    v = torch.tensor([0.125, 0.125, 0.0])
    lam = (0.91 / 3) / (0.25 / 3)
    expected = attention + 0.09 * lam * v  # 0.34095, 0.34095, 0.31
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)
    # the crop score is (alpha + beta) * mean attention: the variance only reorders tokens
    torch.testing.assert_close(crop_scores, torch.tensor([1.09 * 0.91 / 3]), rtol=1e-5, atol=0.0)
    image = ImageTokens(embeds=embeds, grid=(1, 3), signals={"cls_attention": attention})
    # keep one: by holistic score the distinctive token 0 (tie with 1 -> lower index) ...
    assert HoloV(crop_rows=1, crop_cols=1, **FORMER).select(image, 1).keep.tolist() == [0]
    # ... by attention alone (the authors' in-crop ranking, the default) the redundant token 2
    assert HoloV(crop_rows=1, crop_cols=1).select(image, 1).keep.tolist() == [2]


def test_beta_zero_is_per_crop_attention_topk():
    image = _image(12, 12, seed=5)
    keep = HoloV(beta=0.0, **FORMER).select(image, 20).keep
    a = image.signals["cls_attention"]
    crops = crop_partition(12, 12)
    quotas = allocate_quotas([float(a[c].mean()) for c in crops], [c.numel() for c in crops], 20)
    expected = []
    for c, q in zip(crops, quotas):
        expected += c[a[c].argsort(descending=True)[:q]].tolist()
    assert keep.tolist() == sorted(expected)


# ------------------------------------------------------------------------------------ select


def test_crop_with_all_attention_gets_most_of_the_budget():
    h = w = 24  # crops of 6 x 6 = 36 tokens
    image = _image(h, w, seed=2)
    attention = torch.zeros(h * w)
    crop = crop_partition(h, w)[5]
    attention[crop] = torch.rand(crop.numel()) + 0.1
    image.signals["cls_attention"] = attention
    keep = HoloV(**FORMER).select(image, 30).keep
    inside = torch.isin(keep, crop).sum().item()
    assert inside == 30
    # a budget larger than the crop: the crop is kept whole, the rest is spread over the others
    keep = HoloV(**FORMER).select(image, 64).keep
    assert torch.isin(crop, keep).all()
    others = [c for i, c in enumerate(crop_partition(h, w)) if i != 5]
    counts = [torch.isin(keep, c).sum().item() for c in others]
    assert sum(counts) == 64 - 36 and max(counts) - min(counts) <= 1


def test_kept_tokens_are_each_crops_top_tokens_by_score():
    image = _image(24, 24, d=16, seed=4)
    keep = set(HoloV(**FORMER).select(image, 64).keep.tolist())
    crops = crop_partition(24, 24)
    scores, _ = holistic_scores(image.embeds, image.signals["cls_attention"], crops)
    for c in crops:
        kept = [i for i in c.tolist() if i in keep]
        dropped = [i for i in c.tolist() if i not in keep]
        if kept and dropped:
            assert min(scores[kept]) >= max(scores[dropped])


def test_rank_by_attention_uses_attention_inside_crops():
    image = _image(24, 24, d=16, seed=6)
    former = {**FORMER, "rank_by": "attention"}
    keep = set(HoloV(**former).select(image, 64).keep.tolist())
    a = image.signals["cls_attention"]
    for c in crop_partition(24, 24):
        kept = [i for i in c.tolist() if i in keep]
        dropped = [i for i in c.tolist() if i not in keep]
        if kept and dropped:
            assert min(a[kept]) >= max(a[dropped])


@pytest.mark.parametrize(
    "h,w,ks",
    [
        (24, 24, [1, 3, 15, 16, 17, 64, 128, 192, 575]),
        (7, 7, [1, 2, 5, 15, 16, 17, 30, 48]),
        (5, 9, [1, 7, 20, 44]),
        (3, 3, [1, 4, 8]),
        (2, 2, [1, 3]),
        (1, 40, [1, 10, 39]),
        (27, 13, [1, 9, 100, 350]),
    ],
)
@pytest.mark.parametrize("layout", ["blocks", "bands"])
def test_exactly_k_sorted_distinct(h, w, ks, layout):
    image = _image(h, w, seed=h * 31 + w)
    for k in ks:
        keep = HoloV(layout=layout).select(image, k).keep
        assert_valid_keep(keep, h * w, k)


def test_no_grid_is_a_strip():
    image = _image(6, 10, seed=8, grid=False)
    keep = HoloV().select(image, 12).keep
    assert_valid_keep(keep, 60, 12)
    strip = ImageTokens(embeds=image.embeds, grid=(1, 60), signals=image.signals)
    assert torch.equal(keep, HoloV().select(strip, 12).keep)


@pytest.mark.parametrize("h,w,k", [(24, 24, 64), (24, 24, 10), (7, 7, 12), (9, 6, 5), (13, 11, 40)])
@pytest.mark.parametrize("seed", range(3))
def test_former_defaults_match_loop_reference(h, w, k, seed):
    image = _image(h, w, seed=seed * 100 + h + w)
    assert HoloV(**FORMER).select(image, k).keep.tolist() == _ref_select(image, k)


def test_float16_inputs_and_degenerate_signals():
    image = _image(10, 10, seed=9)
    half = ImageTokens(
        embeds=image.embeds.half(),
        grid=(10, 10),
        signals={"cls_attention": image.signals["cls_attention"].half()},
    )
    assert_valid_keep(HoloV().select(half, 17).keep, 100, 17)
    # identical tokens and uniform attention: no crop or token is preferred, still exactly k
    flat = ImageTokens(embeds=torch.ones(100, 4), grid=(10, 10), signals={"cls_attention": torch.ones(100)})
    assert_valid_keep(HoloV().select(flat, 17).keep, 100, 17)
    zero = ImageTokens(embeds=torch.zeros(100, 4), grid=(10, 10), signals={"cls_attention": torch.zeros(100)})
    assert_valid_keep(HoloV().select(zero, 17).keep, 100, 17)


def test_metadata_and_options():
    assert HoloV.name == "holov" and HoloV.where == "pre"
    assert HoloV.signals == ("cls_attention",)
    assert HoloV.default_budget == Budget(tokens=64)
    assert HoloV.code_families == ("llava", "llava_next")
    method = HoloV()
    assert (method.crop_rows, method.crop_cols, method.alpha, method.beta, method.power) == (
        4,
        4,
        1.0,
        0.09,
        1.0,
    )
    assert (method.layout, method.rank_by, method.scoring, method.allocation, method.units, method.crop_count) == (
        "bands", "attention", "code", "code", "joint", "fixed",
    )  # fmt: skip
    for bad in [{"crop_rows": 0}, {"crop_cols": 2.5}, {"power": 0}, {"layout": "x"}, {"rank_by": "x"}]:
        with pytest.raises(MethodOptionError):
            HoloV(**bad)
    for option, choices in [
        ("scoring", "('code', 'centred')"),
        ("allocation", "('code', 'water_fill')"),
        ("units", "('joint', 'per_unit')"),
        ("crop_count", "('fixed', 'per_budget')"),
    ]:
        with pytest.raises(MethodOptionError, match=f"holov: {option} must be one of {re.escape(choices)}"):
            HoloV(**{option: "nope"})
    with pytest.raises(ValueError):
        HoloV().select(ImageTokens(torch.randn(10, 4), (3, 3), {"cls_attention": torch.rand(10)}), 3)


# ------------------------------------------------------------------------------------ the authors' code


def _ref_code_scores(embeds, attention, crops, eps=1e-6):
    """The code's scores with loops in float64: variance over the whole row with the zeroed diagonal,
    attention x 1000, raw attention for one-token crops."""
    f = embeds.double().tolist()
    a = attention.double().tolist()
    norm = [math.sqrt(sum(v * v for v in row)) for row in f]
    scores, crop_scores = [0.0] * len(a), []
    for crop in crops:
        m = len(crop)
        if m == 1:
            scores[crop[0]] = a[crop[0]]
            crop_scores.append(a[crop[0]])
            continue
        var = {}
        for i in crop:
            sims = [
                0.0
                if j == i
                else sum(p * q for p, q in zip(f[i], f[j])) / ((norm[i] + eps) * (norm[j] + eps))
                for j in crop
            ]
            mu = sum(sims) / (m - 1)
            var[i] = sum((x - mu) ** 2 for x in sims) / (m - 1)
        lam = (sum(1000 * abs(a[i]) for i in crop) / m) / (sum(var[i] for i in crop) / m + eps)
        for i in crop:
            scores[i] = 1000 * a[i] + 0.09 * var[i] * lam
        crop_scores.append(sum(scores[i] for i in crop) / m)
    return scores, crop_scores


def _ref_code_select(image: ImageTokens, k: int, count: int = 16) -> list[int]:
    """The code's emitted tokens: bands, floored shares, leftover to the largest weights, whole crops in
    order, else top by attention (decreasing); missing tokens: the best remaining by attention, last."""
    n = image.n
    size, extra = divmod(n, count)
    crops, start = [], 0
    for r in range(count):
        length = size + (r < extra)
        if length:
            crops.append(list(range(start, start + length)))
        start += length
    a = image.signals["cls_attention"].double().tolist()
    _, crop_scores = _ref_code_scores(image.embeds, image.signals["cls_attention"], crops)
    total = sum(crop_scores) + 1e-6
    weights = [c / total for c in crop_scores]
    quotas = [math.floor(w * k) for w in weights]
    for c in sorted(range(len(crops)), key=lambda c: (-weights[c], c))[: k - sum(quotas)]:
        quotas[c] += 1
    emitted = []
    for crop, q in zip(crops, quotas):
        emitted += crop if q >= len(crop) else sorted(crop, key=lambda i: (-a[i], i))[:q]
    rest = sorted(set(range(n)) - set(emitted), key=lambda i: (-a[i], i))
    return emitted + rest[: k - len(emitted)]


def _emitted(selection) -> list[int]:
    return selection.keep[selection.order].tolist()


def test_code_scores_match_loop_reference():
    image = _image(7, 9, seed=3)
    crops = crop_partition(7, 9, 4, 4, "bands") + [torch.tensor([0])]  # a one-token crop too
    scores, crop_scores = code_scores(image.embeds, image.signals["cls_attention"], crops)
    ref_scores, ref_crop_scores = _ref_code_scores(
        image.embeds, image.signals["cls_attention"], [c.tolist() for c in crops]
    )
    torch.testing.assert_close(
        scores.double(), torch.tensor(ref_scores, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        crop_scores.double(), torch.tensor(ref_crop_scores, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    # the zeroed diagonal is counted: larger than the centred variance
    _, centred = holistic_scores(image.embeds, image.signals["cls_attention"], crops[:-1])
    assert not torch.allclose(crop_scores[:-1], centred * 1000, rtol=1e-7)


def test_code_quotas_floor_then_largest_weights():
    # w = 0.25, 0.25, 0.5 (less eps): floors 2, 2, 4; the 2 leftover go to crop 2, then crop 0 (tie, lower)
    assert code_quotas(torch.tensor([1.0, 1.0, 2.0]), 10) == [3, 2, 5]
    # shares are not capped: a dominant crop may get more than it holds
    assert code_quotas(torch.tensor([100.0, 1.0, 1.0]), 20) == [20, 0, 0]
    assert sum(code_quotas(torch.rand(16, generator=torch.Generator().manual_seed(0)), 64)) == 64


@pytest.mark.parametrize(
    "h,w,ks",
    [(24, 24, [16, 64, 128, 192, 300]), (7, 7, [5, 16, 30]), (27, 13, [9, 64, 200]), (1, 40, [3, 20])],
)
@pytest.mark.parametrize("seed", range(3))
def test_default_matches_the_code_loop_reference(h, w, ks, seed):
    image = _image(h, w, seed=seed * 7 + h)
    for k in ks:
        selection = HoloV().select(image, k)
        assert_valid_keep(selection.keep, h * w, k)
        assert _emitted(selection) == _ref_code_select(image, k), k


def test_shares_beyond_a_crop_keep_it_whole_and_fill_with_the_next_tokens():
    """A band with nearly all the attention: the code keeps it whole and pads with zeros; here the missing
    tokens are the best remaining ones by attention, emitted after the crops."""
    image = _image(1, 64, seed=11)
    a = torch.full((64,), 1e-4)
    a[:4] = torch.tensor([0.4, 0.1, 0.3, 0.2])  # band 0 (tokens 0..3)
    a[40] = 5e-3
    image.signals["cls_attention"] = a
    selection = HoloV().select(image, 16)
    emitted = _emitted(selection)
    assert emitted[:4] == [0, 1, 2, 3], "the whole band, in token order"
    assert emitted[4] == 40 and len(emitted) == 16
    assert emitted == _ref_code_select(image, 16)


def test_joint_bands_cross_units():
    """An image of several units (AnyRes base view + tiles): by default the bands run over all its tokens in
    order, as the code cuts the concatenated sequence; units='per_unit' cuts every unit."""
    image = _units_image([(6, 6), (6, 6), (3, 12)], seed=2)
    plain = ImageTokens(embeds=image.embeds, grid=None, signals=image.signals)
    assert torch.equal(HoloV().select(image, 20).keep, HoloV().select(plain, 20).keep)
    from tokprune.methods.holov import image_crops

    crops = image_crops(image, 4, 4, "bands", "holov", "per_unit")
    assert len(crops) == 48 and all(bool((c < 36).all()) or bool((c >= 36).all()) for c in crops)
    assert_valid_keep(HoloV(units="per_unit").select(image, 20).keep, image.n, 20)


def test_per_budget_crop_count():
    assert [crop_count_for(576, k) for k in (64, 128, 192)] == [16, 8, 5]
    assert crop_count_for(100, 100) == 1
    image = _image(24, 24, seed=5)
    for k in (64, 128, 192):
        selection = HoloV(crop_count="per_budget").select(image, k)
        assert _emitted(selection) == _ref_code_select(image, k, crop_count_for(576, k))
    for bad in [{"crop_rows": 2}, {"layout": "blocks"}, {"units": "per_unit"}]:
        with pytest.raises(MethodOptionError, match="used only with crop_count='fixed'"):
            HoloV(crop_count="per_budget", **bad)


# ------------------------------------------------------------------------------------ several units


def _units_image(grids, seed: int = 0, hot: int = 0) -> ImageTokens:
    """Units of the given (h, w) grids laid one after the other (tile / frame order); unit `hot` holds
    most of the attention."""
    sizes = [h * w for h, w in grids]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    image = _image(1, sum(sizes), seed=seed, grid=False)
    a = image.signals["cls_attention"].clone()
    a[starts[hot] : starts[hot] + sizes[hot]] *= 20
    image.signals = {"cls_attention": a / a.sum()}
    image.units = [Unit(torch.arange(s, s + h * w), (h, w), "frame") for s, (h, w) in zip(starts, grids)]
    return image


def _ref_select_units(
    image: ImageTokens, k: int, rows: int = 4, cols: int = 4
) -> tuple[list[int], list[int]]:
    """(kept indices, per-unit kept counts): every unit cut into its own crops; all crops share k."""
    crops, owner = [], []
    for u, unit in enumerate(image.units):
        h, w = unit.grid
        start = int(unit.index[0])
        for crop in _ref_crops(h, w, rows, cols):
            crops.append([start + i for i in crop])
            owner.append(u)
    scores, crop_scores = _ref_scores(image.embeds, image.signals["cls_attention"], crops)
    quotas = _ref_quotas([max(s, 0.0) for s in crop_scores], [len(c) for c in crops], k)
    keep, per_unit = [], [0] * len(image.units)
    for crop, q, u in zip(crops, quotas, owner):
        keep += sorted(crop, key=lambda i: (-scores[i], i))[:q]
        per_unit[u] += q
    return sorted(keep), per_unit


@pytest.mark.parametrize(
    "grids,k", [([(6, 6), (6, 6)], 18), ([(4, 4), (6, 4), (5, 5)], 20), ([(8, 8), (3, 7)], 9)]
)
def test_units_share_the_budget_by_crop_score(grids, k):
    """AnyRes tiles / video frames: every unit is cut into its own crops and all crops share k by crop
    score (not the units by size): the unit holding the attention gets more than its size share."""
    image = _units_image(grids, seed=k)
    method = HoloV(**FORMER)
    assert not method.spatial  # the engine hands over the whole image, units included
    keep = select_units(method, image, k).keep
    assert_valid_keep(keep, image.n, k)
    expected, per_unit = _ref_select_units(image, k)
    assert keep.tolist() == expected
    assert sum(per_unit) == k
    size_share = k * grids[0][0] * grids[0][1] / image.n
    assert per_unit[0] > size_share  # unit 0 holds the attention


def test_crops_never_span_two_units():
    """Each 2 x 8 frame gets its own crop partition (`crop_partition(2, 8)`); no crop spans two frames."""
    from tokprune.methods.holov import image_crops

    image = _units_image([(2, 8), (2, 8)])
    crops = image_crops(image, 4, 4, "blocks", "holov")
    assert sorted(torch.cat(crops).tolist()) == list(range(32))
    assert all(bool((c < 16).all()) or bool((c >= 16).all()) for c in crops)
    assert len(crops) == 2 * len(crop_partition(2, 8))


def test_anyres_image_in_the_engine(tiny, monkeypatch):
    """LLaVA-NeXT: HoloV sees each image whole (base view + tiles) and keeps exactly its count."""
    from tiny_models import batch_inputs

    model, proc = tiny("llava_next", "sdpa")
    seen = []
    original = HoloV.select

    def record(self, image, k):
        selection = original(self, image, k)
        seen.append((len(image.units or ()), k, selection.keep.numel()))
        return selection

    monkeypatch.setattr(HoloV, "select", record)
    with tokprune.apply(model, "holov", keep_ratio=0.25), torch.no_grad():
        model(**batch_inputs("llava_next", proc, (1,), sizes=((224, 224),)))
    [(units, k, kept)] = seen
    assert units > 2 and kept == k


def test_alpha_beta_need_rank_by_score():
    """alpha / beta weigh the diversity term: refused with rank_by="attention" unless left at the defaults."""
    for bad in [{"alpha": 2.0}, {"beta": 0.0}, {"alpha": 0.5, "beta": 0.5}]:
        with pytest.raises(MethodOptionError, match="used only with rank_by='score'"):
            HoloV(rank_by="attention", **bad)
    HoloV(rank_by="attention", alpha=1.0, beta=0.09)  # the defaults, given explicitly
    HoloV(rank_by="score", alpha=2.0, beta=0.5)
