"""Unit tests of the per-image selection functions on small hand-made tensors with known answers.

Every expected value is computed independently of the library (loops, float64, or by construction).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from checks import assert_valid_keep

from tokprune.core.budget import Budget
from tokprune.errors import BudgetError, MethodOptionError
from tokprune.methods.attention_llm import FastV, PyramidDrop
from tokprune.methods.base import ImageTokens, Selection, topk_sorted
from tokprune.methods.baselines import RandomPrune, SpatialPool, pooling_cells
from tokprune.methods.cls_attention import FasterVLM
from tokprune.methods.dart import DART
from tokprune.methods.divprune import DivPrune, max_min_diverse
from tokprune.methods.visionzip import VisionZip


def _image(n: int, d: int = 8, grid=None, seed: int = 0, **signals) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    return ImageTokens(embeds=torch.randn(n, d, generator=g), grid=grid, signals=dict(signals))


# --------------------------------------------------------------------------------------------- topk


def test_topk_sorted_ties_towards_lower_index():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.2, 0.5])
    assert topk_sorted(scores, 1).tolist() == [1]
    assert topk_sorted(scores, 2).tolist() == [1, 3]
    assert topk_sorted(scores, 4).tolist() == [1, 2, 3, 5]
    assert topk_sorted(torch.zeros(7), 3).tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------- random


def test_random_same_seed_same_selection():
    image = _image(100)
    a = RandomPrune(seed=3).select(image, 10)
    b = RandomPrune(seed=3).select(image, 10)
    assert torch.equal(a.keep, b.keep)
    assert a.merged is None


def test_random_different_seed_different_selection():
    image = _image(100)
    selections = {tuple(RandomPrune(seed=s).select(image, 10).keep.tolist()) for s in range(5)}
    assert len(selections) == 5


@pytest.mark.parametrize("n,k", [(1, 1), (10, 1), (10, 9), (10, 10), (576, 64), (577, 144)])
def test_random_exactly_k_sorted_distinct(n, k):
    keep = RandomPrune(seed=1).select(_image(n), k).keep
    assert_valid_keep(keep, n, k)


def test_random_independent_of_other_images_and_content():
    method = RandomPrune(seed=7)
    first = method.select(_image(64, seed=0), 16).keep
    # other images in between, with other sizes and contents
    for n, seed in [(30, 1), (200, 2), (64, 3)]:
        method.select(_image(n, seed=seed), min(n, 16))
    torch.manual_seed(999)  # the global RNG does not matter either
    again = method.select(_image(64, seed=0), 16).keep
    assert torch.equal(first, again)
    # the selection depends on the number of tokens and the budget only, not on the embeddings
    assert torch.equal(first, method.select(_image(64, seed=42), 16).keep)


# --------------------------------------------------------------------------------------------- pool


def _check_cells(h: int, w: int, k: int) -> None:
    cells = pooling_cells(h, w, k)
    assert len(cells) == k
    covered = []
    for rows, cols in cells:
        assert len(rows) > 0 and len(cols) > 0
        assert rows.step == 1 and cols.step == 1  # rectangles
        assert rows.start >= 0 and rows.stop <= h and cols.start >= 0 and cols.stop <= w
        covered += [(r, c) for r in rows for c in cols]
    assert len(set(covered)) == len(covered), "cells must be disjoint"
    assert set(covered) == {(r, c) for r in range(h) for c in range(w)}, "cells must cover the grid"
    starts = [(rows.start, cols.start) for rows, cols in cells]
    assert starts == sorted(starts), "cells must be in raster order"


def _grid_cases():
    # every square or wide grid up to 9 x 9 and grids up to twice as tall as wide, every k
    small = [(h, w, k) for h in range(1, 10) for w in range(1, 10) if h <= 2 * w for k in range(1, h * w + 1)]
    big = [
        (h, w, k)
        for h, w in [(24, 24), (16, 28), (28, 16), (24, 36), (27, 27), (13, 17)]
        for k in (1, 2, 3, 7, 13, 31, 64, 97, 144, 191, h * w - 1, h * w)
    ]
    return small + big


def test_pooling_cells_partition_the_grid():
    for h, w, k in _grid_cases():
        _check_cells(h, w, k)


@pytest.mark.parametrize("h,w,k", [(3, 1, 1), (4, 1, 2), (6, 2, 1), (7, 2, 2), (20, 2, 3), (40, 4, 5)])
def test_pooling_cells_tall_narrow_grid(h, w, k):
    _check_cells(h, w, k)


@pytest.mark.parametrize(
    "grid,k", [((6, 9), 1), ((6, 9), 5), ((6, 9), 7), ((6, 9), 13), ((6, 9), 54), ((5, 5), 4)]
)
def test_pool_merges_cell_means(grid, k):
    h, w = grid
    image = _image(h * w, d=5, grid=grid, seed=k)
    selection = SpatialPool().select(image, k)
    assert_valid_keep(selection.keep, h * w, k)
    assert selection.merged.shape == (k, 5) and selection.merged.dtype == image.embeds.dtype
    embeds = image.embeds.double()
    for (rows, cols), kept, merged in zip(pooling_cells(h, w, k), selection.keep.tolist(), selection.merged):
        cell = [r * w + c for r in rows for c in cols]
        assert kept in cell
        expected = embeds[cell].mean(0)
        torch.testing.assert_close(merged.double(), expected, atol=1e-6, rtol=0)


def test_pool_without_grid_pools_a_strip():
    image = _image(10, d=3)
    selection = SpatialPool().select(image, 3)
    bounds = [(0, 3), (3, 6), (6, 10)]  # 1 x 10 strip in 3 column bins
    for (lo, hi), kept, merged in zip(bounds, selection.keep.tolist(), selection.merged):
        assert lo <= kept < hi
        torch.testing.assert_close(merged, image.embeds[lo:hi].mean(0), atol=1e-6, rtol=0)


def test_pool_keep_all_is_identity():
    image = _image(12, grid=(3, 4))
    selection = SpatialPool().select(image, 12)
    assert selection.keep.tolist() == list(range(12))
    assert torch.equal(selection.merged, image.embeds)


# ---------------------------------------------------------------------------------------- fastervlm


def test_fastervlm_topk_of_cls_attention_ties_to_lower_index():
    scores = torch.tensor([0.05, 0.2, 0.1, 0.2, 0.01, 0.3, 0.2, 0.0])
    image = _image(8, cls_attention=scores)
    assert FasterVLM().select(image, 1).keep.tolist() == [5]
    assert FasterVLM().select(image, 3).keep.tolist() == [1, 3, 5]
    assert FasterVLM().select(image, 5).keep.tolist() == [1, 2, 3, 5, 6]
    assert FasterVLM().select(image, 3).merged is None


def test_fastervlm_matches_sort_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(576, generator=g)
    keep = FasterVLM().select(_image(576, cls_attention=scores), 64).keep
    expected = sorted(sorted(range(576), key=lambda i: -scores[i].item())[:64])
    assert keep.tolist() == expected


# ---------------------------------------------------------------------------------------- visionzip


def _visionzip_reference(cls_attn, keys, embeds, k, ratio=10 / 64, merge="add"):
    """Independent loop implementation of VisionZip's documented selection and merge (float64): a target
    becomes itself + the mean of the tokens it absorbed (merge="add", the code) or the mean of all of them
    ("mean")."""
    n = len(cls_attn)
    c = min(round(k * ratio), k - 1) if k > 1 else 0
    order = sorted(range(n), key=lambda i: (-float(cls_attn[i]), i))
    dominant = sorted(order[: k - c])
    rest = [i for i in range(n) if i not in set(dominant)]
    step = max(1, len(rest) // c) if c else 1
    targets = [rest[j] for j in range(0, len(rest), step)][:c] if c else []
    others = [i for i in rest if i not in set(targets)] if c else []
    unit = [[float(x) / math.sqrt(sum(float(y) ** 2 for y in row)) for x in row] for row in keys.tolist()]
    members = {t: [t] for t in targets}
    for o in others:
        sims = [sum(a * b for a, b in zip(unit[o], unit[t])) for t in targets]
        members[targets[max(range(len(targets)), key=lambda j: (sims[j], -j))]].append(o)
    e = embeds.double()
    merged = {i: e[i] for i in dominant}
    if merge == "mean":
        merged.update({t: e[m].mean(0) for t, m in members.items()})
    else:
        merged.update({t: e[t] + (e[m[1:]].mean(0) if len(m) > 1 else 0) for t, m in members.items()})
    keep = sorted(merged)
    return dominant, targets, members, keep, torch.stack([merged[i] for i in keep])


def test_visionzip_hand_made_clusters():
    n, k = 24, 13  # c = round(13 * 10 / 64) = 2 contextual targets, 11 dominant tokens
    g = torch.Generator().manual_seed(0)
    cls_attn = torch.randperm(n, generator=g).float()
    dominant = sorted(torch.argsort(cls_attn, descending=True)[:11].tolist())
    rest = [i for i in range(n) if i not in dominant]  # 13 tokens, step 13 // 2 = 6
    targets = [rest[0], rest[6]]
    # keys by construction: target j points along axis j; every other token near the axis of its owner
    owner_of = {o: (0 if idx % 3 else 1) for idx, o in enumerate(rest) if o not in targets}
    keys = torch.randn(n, 4, generator=g) * 0.05
    keys[targets[0]] = torch.tensor([2.0, 0, 0, 0])
    keys[targets[1]] = torch.tensor([0, 3.0, 0, 0])
    for o, j in owner_of.items():
        keys[o, j] += 1.0 + o / 10  # positive scale: cosine ignores it
    image = _image(n, d=6, cls_attention=cls_attn, vit_keys=keys)
    selection = VisionZip(merge="mean").select(image, k)
    assert selection.keep.tolist() == sorted(dominant + targets)
    added = VisionZip().select(image, k)  # the code: target + mean of its members
    for i, kept in enumerate(added.keep.tolist()):
        if kept in targets:
            members = [o for o, owner in owner_of.items() if owner == targets.index(kept)]
            expected = image.embeds[kept] + image.embeds[members].mean(0)
            torch.testing.assert_close(added.merged[i], expected, atol=1e-6, rtol=0)
    for i, kept in enumerate(selection.keep.tolist()):
        if kept in dominant:
            assert torch.equal(selection.merged[i], image.embeds[kept])
        else:
            j = targets.index(kept)
            members = [kept] + [o for o, owner in owner_of.items() if owner == j]
            torch.testing.assert_close(selection.merged[i], image.embeds[members].mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", ["add", "mean"])
@pytest.mark.parametrize("n,k", [(576, 64), (576, 128), (576, 192), (100, 13), (50, 7), (30, 1), (30, 2)])
def test_visionzip_matches_reference(n, k, merge):
    g = torch.Generator().manual_seed(n + k)
    cls_attn = torch.rand(n, generator=g)
    keys = torch.randn(n, 16, generator=g)
    image = _image(n, d=12, seed=k, cls_attention=cls_attn, vit_keys=keys)
    selection = VisionZip(merge=merge).select(image, k)
    dominant, targets, _, keep, merged = _visionzip_reference(cls_attn, keys, image.embeds, k, merge=merge)
    assert_valid_keep(selection.keep, n, k)
    assert selection.keep.tolist() == keep
    c = round(k * 10 / 64) if k > 1 else 0
    assert len(dominant) == k - min(c, k - 1) and len(targets) == min(c, k - 1)
    if targets:
        torch.testing.assert_close(selection.merged.double(), merged, atol=1e-5, rtol=0)
    else:
        assert selection.merged is None


def test_visionzip_64_of_576_is_54_plus_10():
    n, k = 576, 64
    g = torch.Generator().manual_seed(5)
    cls_attn = torch.rand(n, generator=g)
    image = _image(n, cls_attention=cls_attn, vit_keys=torch.randn(n, 8, generator=g))
    keep = VisionZip().select(image, k).keep.tolist()
    top54 = set(torch.argsort(cls_attn, descending=True)[:54].tolist())
    assert len(keep) == 64
    assert top54 <= set(keep)
    contextual = [i for i in keep if i not in top54]
    assert len(contextual) == 10
    rest = [i for i in range(n) if i not in top54]  # 522 tokens, step 52
    assert contextual == [rest[j] for j in range(0, 520, 52)]


# ----------------------------------------------------------------------------------------- divprune


def _greedy_reference(points, distance, k):
    """Brute-force greedy max-min: returns the pick order and the smallest winning margin."""
    n = len(points)
    nearest = [min(distance(points[i], points[j]) for j in range(n) if j != i) for i in range(n)]
    scores = list(nearest)
    chosen, margin = [], math.inf
    for _ in range(k):
        candidates = sorted(((scores[i], -i) for i in range(n) if i not in chosen), reverse=True)
        if len(candidates) > 1:
            margin = min(margin, candidates[0][0] - candidates[1][0])
        pick = -candidates[0][1]
        chosen.append(pick)
        scores = [min(distance(points[c], points[i]) for c in chosen) for i in range(n)]
    return chosen, margin


def _cosine_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return 1.0 - dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_divprune_on_a_line_picks_extremes_then_spreads():
    # positions on a line, shuffled; mapped to unit vectors by angle (cosine distance is monotone in |dt|)
    positions = [0.52, 0.0, 0.88, 0.37, 1.0, 0.66, 0.31, 0.83, 0.45, 0.74]
    angles = torch.tensor(positions, dtype=torch.float64) * (math.pi / 2)
    features = torch.stack([angles.cos(), angles.sin()], dim=1).float()
    order, _ = _greedy_reference(positions, lambda a, b: abs(a - b), len(positions))
    # 0.0 is the most isolated point, then the farthest from it, then the middle
    assert [positions[i] for i in order[:3]] == [0.0, 1.0, 0.52]
    for k in range(1, len(positions) + 1):
        keep = max_min_diverse(features, k)
        assert_valid_keep(keep, len(positions), k)
        assert keep.tolist() == sorted(order[:k]), f"k={k}"


def test_divprune_duplicates_are_spread_out():
    base = torch.eye(3)
    features = torch.cat([base, base * 2, base * 0.5])  # three directions, three copies each
    keep = max_min_diverse(features, 3).tolist()
    assert sorted(i % 3 for i in keep) == [0, 1, 2]


@pytest.mark.parametrize("seed", range(6))
def test_divprune_matches_brute_force_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = 20 + 3 * seed, 2 + seed
    features = torch.randn(n, d, generator=g)
    points = features.double().tolist()
    order, margin = _greedy_reference(points, _cosine_distance, n - 1)
    assert margin > 1e-5, "inputs must have no near-ties for a float32 vs float64 comparison"
    for k in (1, 2, 5, n // 2, n - 1):
        assert max_min_diverse(features, k).tolist() == sorted(order[:k]), f"k={k}"
    assert DivPrune().select(ImageTokens(embeds=features, grid=None), 5).keep.tolist() == sorted(order[:5])


# ------------------------------------------------------------------------------------ fastv / pdrop


def test_fastv_and_pdrop_topk_on_last_query_attention():
    scores = torch.tensor([0.3, 0.1, 0.4, 0.1, 0.5, 0.4, 0.0])
    image = _image(7, last_query_attention=scores)
    for method in (FastV(), PyramidDrop()):
        assert method.select(image, 1).keep.tolist() == [4]
        assert method.select(image, 3).keep.tolist() == [2, 4, 5]
        assert method.select(image, 5).keep.tolist() == [0, 1, 2, 4, 5]


def test_fastv_boundaries():
    assert FastV().boundaries(32) == [2]
    assert FastV(layer=31).boundaries(32) == [31]
    for bad in (0, -1, 32, 40, 2.0, "2"):
        with pytest.raises(MethodOptionError):
            FastV(layer=bad).boundaries(32)


def test_pdrop_default_boundaries():
    assert PyramidDrop().boundaries(32) == [8, 16, 24]
    assert PyramidDrop().boundaries(4) == [1, 2, 3]
    assert PyramidDrop().boundaries(28) == [7, 14, 21]
    assert PyramidDrop(ratios=(0.5, 0.5)).boundaries(30) == [10, 20]
    assert PyramidDrop(layers=(4, 9)).boundaries(32) == [4, 9]


def test_pdrop_stage_counts():
    assert PyramidDrop().stage_counts(576, Budget(ratio=0.125)) == [288, 144, 72]
    assert PyramidDrop(ratios=(0.5, 0.5, 0.5)).stage_counts(576, Budget(ratio=0.125)) == [288, 144, 72]
    assert PyramidDrop(ratios=(0.5, 0.5, 0.5)).stage_counts(576, Budget(tokens=10)) == [288, 144, 72]
    assert PyramidDrop(ratios=(0.5, 0.25)).stage_counts(100, Budget(ratio=0.5)) == [50, 13]
    assert PyramidDrop().stage_counts(576, Budget(ratio=1.0)) == [576, 576, 576]
    assert PyramidDrop(layers=(8, 16)).stage_counts(576, Budget(ratio=0.125)) == [
        math.ceil(576 * math.sqrt(0.125)),
        72,
    ]
    for n in (1, 7, 64, 576, 1000):
        for budget in (Budget(ratio=0.1), Budget(ratio=0.5), Budget(tokens=20)):
            counts = PyramidDrop().stage_counts(n, budget)
            assert len(counts) == 3 and counts[-1] == budget.kept(n)
            assert all(a >= b for a, b in zip([n, *counts], counts)), counts


def test_fastv_and_pdrop_rounding_options():
    """ "ceil" by default (DESIGN §3); "round" / "floor": the llava-hf FastV port's / PyramidDrop's counts."""
    assert FastV().stage_counts(729, Budget(ratio=0.5)) == [365]
    assert FastV(rounding="round").stage_counts(729, Budget(ratio=0.5)) == [364]
    assert FastV(rounding="round").stage_counts(729, Budget(tokens=100)) == [100]
    assert PyramidDrop(rounding="floor").stage_counts(729, Budget(ratio=0.125)) == [364, 182, 91]
    floor_ratios = PyramidDrop(rounding="floor", ratios=(0.5, 0.5, 0.5))
    assert floor_ratios.stage_counts(729, Budget(ratio=0.125)) == [364, 182, 91]
    assert PyramidDrop(rounding="floor").stage_counts(576, Budget(ratio=0.125)) == [288, 144, 72]
    assert PyramidDrop(rounding="floor").stage_counts(576, Budget(tokens=64))[-1] == 64
    assert PyramidDrop(rounding="floor").stage_counts(7, Budget(ratio=0.125)) == [3, 1, 1]  # never 0
    for method, bad in ((FastV, "floor"), (FastV, None), (PyramidDrop, "round"), (PyramidDrop, 1)):
        with pytest.raises(MethodOptionError, match="rounding"):
            method(rounding=bad)


@pytest.mark.parametrize(
    "options",
    [
        dict(ratios=(0.5, 1.5, 0.5)),
        dict(ratios=(0.0, 0.5, 0.5)),
        dict(ratios=(-0.5,)),
        dict(ratios=(0.5, "a")),
        dict(layers=(8, 16, 24), ratios=(0.5, 0.5)),
    ],
)
def test_pdrop_bad_ratios_raise(options):
    with pytest.raises(MethodOptionError):
        PyramidDrop(**options)


@pytest.mark.parametrize("layers", [(0, 8, 16), (8, 16, 32), (8, 8, 24), (16, 8, 24), (8, 16.0, 24), (-1,)])
def test_pdrop_bad_layers_raise(layers):
    with pytest.raises(MethodOptionError):
        PyramidDrop(layers=layers).boundaries(32)


def test_pdrop_too_shallow_llm_raises():
    with pytest.raises(MethodOptionError):
        PyramidDrop().boundaries(3)  # default layers 0, 1, 2: layer 0 is not a boundary


@pytest.mark.parametrize("options", [dict(ratios=0.5), dict(layers=8), dict(ratios=())])
def test_pdrop_non_sequence_options_raise(options):
    with pytest.raises(MethodOptionError):
        PyramidDrop(**options).boundaries(32)


# --------------------------------------------------------------------------------------------- dart


def _dart_reference(keys, hidden, k, pivots, text_keys=None, text_hidden=None):
    """Loop implementation of DART's documented selection (float64)."""
    n = len(keys)
    l1 = [sum(abs(x) for x in row) for row in keys.double().tolist()]
    n_text = min(pivots // 2, 0 if text_keys is None else len(text_keys))
    n_image = min(pivots - n_text, k)
    image_pivots = sorted(range(n), key=lambda i: -l1[i])[:n_image]
    pivot_vectors = [hidden[i].double() for i in image_pivots]
    if n_text:
        t1 = [sum(abs(x) for x in row) for row in text_keys.double().tolist()]
        pivot_vectors += [
            text_hidden[i].double() for i in sorted(range(len(t1)), key=lambda i: -t1[i])[:n_text]
        ]
    kept = list(image_pivots)
    remaining = k - n_image
    for p, vector in enumerate(pivot_vectors):
        share = remaining // len(pivot_vectors) + (1 if p < remaining % len(pivot_vectors) else 0)
        sims = {
            i: float(F.cosine_similarity(vector, hidden[i].double(), dim=0))
            for i in range(n)
            if i not in kept
        }
        kept += sorted(sims, key=lambda i: sims[i])[:share]
    return image_pivots, sorted(kept)


def test_dart_hand_made_least_similar_to_pivots():
    degrees = [170, 10, 0, 100, 160, 20, 90, 275, 45, 250]
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    hidden = torch.stack([radians.cos(), radians.sin()], dim=1).float() * 3
    keys = torch.full((10, 4), 0.1)
    keys[2] = torch.tensor([1.0, -2.0, 1.0, 0.5])  # L1 4.5: first pivot (angle 0)
    keys[6] = torch.tensor([-1.0, 1.0, -1.0, 0.5])  # L1 3.5: second pivot (angle 90)
    image = ImageTokens(embeds=torch.randn(10, 6), grid=None, signals={"keys": keys, "hidden": hidden})
    # pivot at 0 deg keeps the two tokens nearest 180 deg (170, 160); pivot at 90 deg those nearest 270 (275, 250)
    assert DART(pivot_order="norm", key_positions="given", pivots=2).select(image, 6).keep.tolist() == [
        0,
        2,
        4,
        6,
        7,
        9,
    ]
    assert DART(pivot_order="norm", key_positions="given", pivots=2).select(image, 2).keep.tolist() == [2, 6]
    assert DART(pivot_order="norm", key_positions="given", pivots=2).select(image, 1).keep.tolist() == [2]
    assert DART(pivot_order="norm", key_positions="given", pivots=2).select(image, 3).keep.tolist() == [
        0,
        2,
        6,
    ]  # the first pivot's share is larger
    assert DART(pivot_order="norm", key_positions="given", pivots=2).select(image, 3).merged is None


@pytest.mark.parametrize("with_text", [False, True])
@pytest.mark.parametrize("pivots", [1, 2, 8])
@pytest.mark.parametrize("k", [1, 3, 8, 20, 49, 64])
def test_dart_matches_reference(k, pivots, with_text):
    g = torch.Generator().manual_seed(k * 31 + pivots)
    n, d = 64, 12
    keys = torch.randn(n, 16, generator=g)
    hidden = torch.randn(n, d, generator=g)
    text = {}
    if with_text:
        text = {"keys": torch.randn(3, 16, generator=g), "hidden": torch.randn(3, d, generator=g)}
    image = ImageTokens(
        embeds=torch.randn(n, d, generator=g), grid=None, signals={"keys": keys, "hidden": hidden}, text=text
    )
    keep = DART(pivot_order="norm", key_positions="given", pivots=pivots).select(image, k).keep
    assert_valid_keep(keep, n, k)
    image_pivots, expected = _dart_reference(keys, hidden, k, pivots, text.get("keys"), text.get("hidden"))
    assert set(image_pivots) <= set(keep.tolist())
    n_text = min(pivots // 2, 3) if with_text else 0
    assert len(image_pivots) == min(pivots - n_text, k)
    assert keep.tolist() == expected


def test_dart_bad_pivots_raise():
    for bad in (0, -2, 2.5):
        with pytest.raises(MethodOptionError):
            DART(pivots=bad)
    with pytest.raises(MethodOptionError):
        DART(layer=0).boundaries(32)
    assert DART().boundaries(32) == [2]


# ------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize(
    "budget,keep_ratio",
    [
        (64, 0.5),
        (0, None),
        (-3, None),
        (2.5, None),
        ("64", None),
        (True, None),
        (None, 0.0),
        (None, -0.1),
        (None, 1.01),
        (None, float("nan")),
        (None, True),
        (None, "0.5"),
    ],
)
def test_budget_from_args_errors(budget, keep_ratio):
    with pytest.raises(BudgetError):
        Budget.from_args(budget, keep_ratio, Budget(ratio=0.5))


def test_budget_from_args_valid():
    default = Budget(tokens=64)
    assert Budget.from_args(None, None, default) is default
    assert Budget.from_args(128, None, default) == Budget(tokens=128)
    assert Budget.from_args(None, 0.25, default) == Budget(ratio=0.25)
    assert Budget.from_args(None, 1, default) == Budget(ratio=1.0)


def test_budget_kept():
    assert Budget(tokens=64).kept(576) == 64
    assert Budget(tokens=64).kept(50) == 50
    assert Budget(ratio=0.25).kept(576) == 144
    assert Budget(ratio=0.125).kept(576) == 72
    assert Budget(ratio=0.098).kept(576) == 57  # ceil(56.448)
    assert Budget(ratio=0.1).kept(30) == 3  # 0.1 * 30 = 3.0000000000000004 in floating point
    assert Budget(ratio=0.5).kept(7) == 4
    assert Budget(ratio=1.0).kept(9) == 9
    assert Budget(ratio=0.01).kept(1) == 1
    for n in range(1, 200):
        for ratio in (0.05, 0.098, 1 / 3, 0.5, 0.75):
            assert Budget(ratio=ratio).kept(n) == math.ceil(round(ratio * n, 9))


def test_divprune_default_budget_matches_its_docstring():
    assert DivPrune.default_budget.kept(576) == 56  # the code's int(round(0.098 * n))
    assert "56 of 576" in DivPrune.__doc__


def test_selection_dataclass_defaults():
    selection = Selection(keep=torch.tensor([0, 2]))
    assert selection.merged is None
