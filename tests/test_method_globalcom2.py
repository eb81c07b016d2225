"""Unit tests of GlobalCom² (tokprune/methods/globalcom2.py) on hand-made base-view + tile-mosaic images.

The reference recomputes the selection with Python loops in float64: crop areas by exact fractions,
the thumbnail's map resized by explicit bilinear weights (half-pixel centres, edges clamped).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from anyres_images import anyres_image, anyres_units, kept_per_part, parts, ref_regions
from checks import assert_valid_keep

from tokprune.core.budget import Budget, split_budget
from tokprune.errors import MethodOptionError
from tokprune.methods import REGISTRY
from tokprune.methods.anyres import anyres_mosaic
from tokprune.methods.base import ImageTokens
from tokprune.methods.globalcom2 import (
    GlobalCom2,
    block_regions,
    code_counts,
    crop_sigma,
    crop_weights,
    global_crop_scores,
)
from tokprune.methods.holov import allocate_quotas

# the earlier default (tokprune's reading of the paper), kept as options; the tests above the "code's
# defaults" section check it
OLD = dict(score="attention", layer=None, crop_areas="unpadded", allocation="proportional")

LAYOUTS = [
    ((4, 4), (4, 4), (4, 4)),
    ((4, 4), (3, 3), (4, 2)),
    ((4, 4), (1,), (4, 4)),
    ((4, 4), (4, 4), (2,)),
    ((3, 3), (3,), (3,)),
    ((5, 5), (5, 5), (3, 3)),
    ((7, 7), (5, 5), (7, 7)),
]


# ------------------------------------------------------------------------------------ reference


def _ref_bilinear(grid: list[list[float]], out_h: int, out_w: int) -> list[list[float]]:
    """Resize a map: output pixel centre (y + 1/2) maps to input coordinate (y + 1/2) * S / H - 1/2,
    clamped at 0; linear weights between the two nearest input rows (the last one repeated)."""
    s_h, s_w = len(grid), len(grid[0])

    def taps(dst: int, size_in: int, size_out: int) -> tuple[int, int, float]:
        src = max((dst + 0.5) * size_in / size_out - 0.5, 0.0)
        lo = int(math.floor(src))
        return lo, min(lo + 1, size_in - 1), src - lo

    out = []
    for y in range(out_h):
        y0, y1, ly = taps(y, s_h, out_h)
        row = []
        for x in range(out_w):
            x0, x1, lx = taps(x, s_w, out_w)
            row.append(
                (1 - ly) * ((1 - lx) * grid[y0][x0] + lx * grid[y0][x1])
                + ly * ((1 - lx) * grid[y1][x0] + lx * grid[y1][x1])
            )
        out.append(row)
    return out


def _unit_norm(values: list[float]) -> list[float]:
    norm = max(math.sqrt(sum(v * v for v in values)), 1e-12)
    return [v / norm for v in values]


def _ranked(indices: list[int], score: dict[int, float]) -> list[int]:
    return sorted(indices, key=lambda i: (-score[i], i))


def _ref_select(image: ImageTokens, k: int, layout, temperature=0.1, alpha=0.5) -> list[int]:
    base, tile_rows, tile_cols = layout
    units, origins = anyres_units(base, list(tile_rows), list(tile_cols))
    attention = image.signals["cls_attention"].double().tolist()
    base_idx = units[0].index.tolist()
    crops = [u.index.tolist() for u in units[1:]]
    sizes = [len(c) for c in crops]
    k_base, k_crops = split_budget(k, [len(base_idx), sum(sizes)])
    big_h, big_w = sum(tile_rows), sum(tile_cols)
    region = ref_regions(base, origins, [u.grid for u in units[1:]], (big_h, big_w))
    thumb = [attention[i] for i in base_idx]
    s = [sum(a for a, r in zip(thumb, region) if r == t) for t in range(len(crops))]
    top = max(v / temperature for v in s)
    e = [math.exp(v / temperature - top) for v in s]
    sigma = [v / sum(e) for v in e]
    weights = [n * (1 + sg - 1 / len(crops)) for n, sg in zip(sizes, sigma)]
    quotas = allocate_quotas(weights, sizes, k_crops)
    keep = _ranked(base_idx, dict(zip(base_idx, thumb)))[:k_base]
    big = _ref_bilinear([thumb[r * base[1] : (r + 1) * base[1]] for r in range(base[0])], big_h, big_w)
    for crop, unit, (r0, c0), q in zip(crops, units[1:], origins, quotas):
        h, w = unit.grid
        glob = _unit_norm([big[r0 + i][c0 + j] for i in range(h) for j in range(w)])
        local = _unit_norm([attention[i] for i in crop])
        score = {i: alpha * g + (1 - alpha) * v for i, g, v in zip(crop, glob, local)}
        keep += _ranked(crop, score)[:q]
    return sorted(keep)


# ------------------------------------------------------------------------------------ crop ratios


def _thumbnail(image: ImageTokens, values: dict[int, float]) -> ImageTokens:
    """Set the thumbnail's attention: given base tokens get their value, every other base token 0."""
    n_base = image.units[0].index.numel()
    attention = image.signals["cls_attention"].clone()
    attention[:n_base] = 0.0
    for i, v in values.items():
        attention[i] = v
    image.signals["cls_attention"] = attention
    return image


def test_crop_retention_follows_thumbnail_attention():
    # all thumbnail attention in quadrant 0 (tile 0's area): sigma ≈ (1, 0, 0, 0); 32 crop tokens shared
    # by weight 16 * (1 + sigma - 1/4): 14 for crop 0 (13.999), 6 for each other (6.0004)
    image = _thumbnail(anyres_image(seed=1), {0: 0.25, 1: 0.25, 4: 0.25, 5: 0.25})
    keep = GlobalCom2(**OLD).select(image, 40).keep
    assert kept_per_part(image, keep) == [8, 14, 6, 6, 6]
    # half in quadrant 0, half in quadrant 3 at a high temperature: sigma ≈ uniform -> shares by size
    image = _thumbnail(anyres_image(seed=2), {0: 0.5, 15: 0.5})
    assert kept_per_part(image, GlobalCom2(**OLD, temperature=1e9).select(image, 40).keep) == [8, 8, 8, 8, 8]


def test_uniform_ratios_give_crops_their_size_share():
    image = anyres_image(tile_rows=(4, 4), tile_cols=(4, 2), seed=3)  # crops of 16, 8, 16, 8 tokens
    keep = GlobalCom2(**OLD, temperature=1e9).select(image, 30).keep
    # thumbnail: 30 * 16/64 = 7.5 -> 8 (tie to the first part); crops 22 by size: 7.33, 3.67, 7.33, 3.67
    assert kept_per_part(image, keep) == [8, 7, 4, 7, 4]


def test_unequal_crops_keep_the_papers_ratio_proportions():
    # crops of 16, 8, 16, 8 tokens; all thumbnail attention in crop 0's area: sigma ≈ (1, 0, 0, 0), so the
    # paper's ratios r_j = R (1 + sigma_j - 1/4) stand as 1.75 : 0.75 : 0.75 : 0.75. k = 35: thumbnail
    # 8.75 -> 9, crops 26; counts ∝ size * ratio = 28 : 6 : 12 : 6 (sum 52), i.e. 14, 3, 6, 3 for 26
    image = _thumbnail(anyres_image(tile_rows=(4, 4), tile_cols=(4, 2), seed=10), {0: 1.0})
    keep = GlobalCom2(**OLD).select(image, 35).keep
    counts = kept_per_part(image, keep)
    assert counts == [9, 14, 3, 6, 3]
    ratios = [c / len(idx) for c, idx in zip(counts[1:], parts(image)[1:])]
    assert ratios[0] / ratios[1] == pytest.approx(1.75 / 0.75) and ratios[1] == ratios[2] == ratios[3]


def test_crop_weights_formula():
    image = _thumbnail(anyres_image(seed=4), {0: 0.3, 3: 0.2, 12: 0.1, 15: 0.4})
    mosaic = anyres_mosaic(image, "test")
    s = torch.tensor([0.3, 0.2, 0.1, 0.4])
    sigma = torch.softmax(s / 0.5, 0)
    expected = (16 * (1 + sigma - 0.25)).tolist()
    assert crop_weights(mosaic, image.signals["cls_attention"][:16], 0.5) == pytest.approx(expected)


# ------------------------------------------------------------------------------------ thumbnail, tokens


def test_thumbnail_keeps_its_size_share_by_its_own_attention():
    image = anyres_image(seed=5)
    for k in (5, 20, 40, 79):
        keep = GlobalCom2(**OLD).select(image, k).keep
        k_base = split_budget(k, [16, 64])[0]
        thumb = image.signals["cls_attention"][:16]
        expected = torch.sort(thumb, descending=True, stable=True).indices[:k_base].sort().values
        assert torch.equal(keep[keep < 16], expected)


def test_global_attention_alone_ranks_tokens_by_the_resized_thumbnail():
    # thumbnail attention grows along columns (and a little along rows): the resized map does too, so
    # with alpha 1 (global score alone) a 4 x 4 crop keeping 4 tokens keeps its right-most column
    image = anyres_image(seed=6)
    i, j = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    image.signals["cls_attention"][:16] = (1 + j + 0.1 * i).reshape(-1) / 100
    keep = GlobalCom2(**OLD, alpha=1.0, temperature=1e9).select(image, 20).keep  # thumbnail 4, crops 4 each
    for idx in parts(image)[1:]:
        right_column = idx.view(4, 4)[:, -1]
        assert torch.equal(keep[torch.isin(keep, idx)], right_column)


def test_alpha_weights_global_and_local_scores():
    # thumbnail attention 1 on base token (0, 0), 0 elsewhere: resized onto the 8 x 8 mosaic, crop 0 sees
    # g = a a^T with a = (1, 0.75, 0.25, 0), so normalised g = 1 / 1.625 at its token 0 and 0 at token 15;
    # the crop's own attention is 1 at token 15 only. One token per crop (k = 5, equal ratios): token 0
    # wins when alpha / 1.625 > 1 - alpha, i.e. alpha > 0.619; the paper's alpha = 0.5 keeps token 15
    image = anyres_image(seed=11)
    crop0 = image.units[1].index
    attention = torch.zeros(image.n)
    attention[0] = 1.0
    attention[crop0[15]] = 1.0
    image.signals["cls_attention"] = attention
    for alpha, expected in [(1.0, 0), (0.75, 0), (0.5, 15), (0.0, 15)]:
        keep = GlobalCom2(**OLD, alpha=alpha, temperature=1e9).select(image, 5).keep
        assert kept_per_part(image, keep) == [1, 1, 1, 1, 1]
        assert keep[torch.isin(keep, crop0)].tolist() == [int(crop0[expected])], alpha


def test_alpha_zero_ranks_crop_tokens_by_their_own_attention():
    image = anyres_image(seed=7)
    keep = set(GlobalCom2(**OLD, alpha=0.0).select(image, 37).keep.tolist())
    attention = image.signals["cls_attention"]
    for idx in parts(image)[1:]:
        kept = [i for i in idx.tolist() if i in keep]
        dropped = [i for i in idx.tolist() if i not in keep]
        if kept and dropped:
            assert min(attention[kept]) >= max(attention[dropped])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_global_scores_match_loop_bilinear(layout):
    base, tile_rows, tile_cols = layout
    image = anyres_image(base, tile_rows, tile_cols, seed=8)
    mosaic = anyres_mosaic(image, "test")
    thumb = image.signals["cls_attention"][: base[0] * base[1]]
    grid = thumb.double().view(*base).tolist()
    big = _ref_bilinear(grid, *mosaic.size)
    for scores, tile, (r0, c0) in zip(global_crop_scores(mosaic, thumb), mosaic.tiles, mosaic.origins):
        h, w = tile.grid
        expected = torch.tensor([big[r0 + i][c0 + j] for i in range(h) for j in range(w)])
        torch.testing.assert_close(scores.double(), expected.double(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature,alpha", [(0.1, 0.5), (1.0, 1.0), (0.02, 0.25), (0.5, 0.0)])
def test_exactly_k_and_matches_loop_reference(layout, temperature, alpha):
    base, tile_rows, tile_cols = layout
    image = anyres_image(base, tile_rows, tile_cols, seed=len(tile_cols) + base[0])
    method = GlobalCom2(**OLD, temperature=temperature, alpha=alpha)
    for k in range(1, image.n):
        keep = method.select(image, k).keep
        assert_valid_keep(keep, image.n, k)
        assert keep.tolist() == _ref_select(image, k, layout, temperature, alpha), k


def test_float16_signals_plain_images_and_layer_option():
    image = anyres_image(signals=("cls_attention@-1",), seed=9)
    image.signals = {name: value.half() for name, value in image.signals.items()}
    method = GlobalCom2(**dict(OLD, layer=-1))
    assert method.signals == ("cls_attention@-1",)
    assert_valid_keep(method.select(image, 21).keep, image.n, 21)
    plain = ImageTokens(embeds=torch.zeros(16, 2), grid=(4, 4), signals={"cls_attention": torch.rand(16)})
    with pytest.raises(ValueError, match="AnyRes"):
        GlobalCom2(**OLD).select(plain, 4)
    with pytest.raises(ValueError, match="AnyRes"):
        GlobalCom2().select(plain, 4)


def test_metadata_and_options():
    assert REGISTRY["globalcom2"] is GlobalCom2
    assert GlobalCom2.where == "pre" and GlobalCom2.needs_tiles and not GlobalCom2.spatial
    assert GlobalCom2.default_budget == Budget(ratio=0.25)
    assert GlobalCom2.code_families == ("llava_next",)
    method = GlobalCom2()
    assert (method.score, method.layer, method.temperature, method.alpha) == ("logits", -1, None, 0.5)
    assert (method.crop_areas, method.allocation, method.tau) == ("blocks", "code", 10.0)
    assert method.signals == ("cls_logits@-1",)
    old = GlobalCom2(**OLD)
    assert old.signals == ("cls_attention",) and old.tau == 0.1
    assert GlobalCom2(score="attention", temperature=2.0).tau == 2.0
    assert GlobalCom2(layer=None).signals == ("cls_logits",)
    bad = [
        {"temperature": 0},
        {"temperature": -1.0},
        {"temperature": float("inf")},
        {"temperature": "hot"},
        {"alpha": -0.5},
        {"alpha": 1.5},
        {"alpha": float("nan")},
        {"alpha": True},
        {"layer": 1.0},
        {"layer": "last"},
    ]
    for options in bad:
        with pytest.raises(MethodOptionError):
            GlobalCom2(**options)
    for option, value, choices in [
        ("score", "softmax", "('logits', 'attention')"),
        ("crop_areas", "areas", "('blocks', 'unpadded')"),
        ("allocation", None, "('code', 'proportional')"),
    ]:
        with pytest.raises(MethodOptionError, match=f"{option} must be one of {re.escape(choices)}"):
            GlobalCom2(**{option: value})


# ------------------------------------------------------------------------------------ the code's defaults


def _ref_code_select(image: ImageTokens, k: int, layout, signal: str = "cls_logits@-1") -> tuple[list, list]:
    """The authors' rules (crop ratios from equal thumbnail blocks, temperature 10, floors reconciled to k,
    crops ranked by L2-normalised own + global scores) in Python loops; (kept sorted, emission order)."""
    base, tile_rows, tile_cols = layout
    units, origins = anyres_units(base, list(tile_rows), list(tile_cols))
    scores = image.signals[signal].double().tolist()
    base_idx = units[0].index.tolist()
    crops = [u.index.tolist() for u in units[1:]]
    n_rows, n_cols = len(tile_rows), len(tile_cols)
    thumb = [scores[i] for i in base_idx]
    block_h, block_w = max(base[0] // n_rows, 1), max(base[1] // n_cols, 1)
    sums = [0.0] * len(crops)
    for i in range(base[0]):
        for j in range(base[1]):
            sums[min(i // block_h, n_rows - 1) * n_cols + min(j // block_w, n_cols - 1)] += thumb[
                i * base[1] + j
            ]
    e = [math.exp((v - max(sums)) / 10.0) for v in sums]
    sigma = [v / (sum(e) + 1e-8) for v in e]
    mean = sum(sigma) / len(sigma)
    ratio = k / image.n
    targets = [len(base_idx) * ratio] + [
        len(c) * min(1.0, ratio * (1 + sg - mean)) for c, sg in zip(crops, sigma)
    ]
    sizes = [len(base_idx)] + [len(c) for c in crops]
    counts = [min(sz, math.floor(t)) for t, sz in zip(targets, sizes)]
    while sum(counts) < k:
        best = max(
            (i for i in range(len(sizes)) if counts[i] < sizes[i]), key=lambda i: (targets[i] - counts[i], -i)
        )
        counts[best] += 1
    while sum(counts) > k:
        worst = min(
            (i for i in range(len(sizes)) if counts[i] > 0), key=lambda i: (targets[i] - counts[i], i)
        )
        counts[worst] -= 1
    ranked_base = _ranked(base_idx, dict(zip(base_idx, thumb)))[: counts[0]]
    big_h, big_w = sum(tile_rows), sum(tile_cols)
    big = _ref_bilinear([thumb[r * base[1] : (r + 1) * base[1]] for r in range(base[0])], big_h, big_w)
    placed = []
    for t, (crop, unit, (r0, c0), q) in enumerate(zip(crops, units[1:], origins, counts[1:])):
        h, w = unit.grid
        glob = _unit_norm([big[r0 + i][c0 + j] for i in range(h) for j in range(w)])
        local = _unit_norm([scores[i] for i in crop])
        score = {i: 0.5 * g + 0.5 * v for i, g, v in zip(crop, glob, local)}
        kept = sorted(_ranked(crop, score)[:q])
        tr, tc = divmod(t, n_cols)
        for i in kept:  # the code's place: the index among the crop's tokens, in the full base-sized tile
            pos = crop.index(i)
            placed.append(((tr * base[0] + pos // base[1], tc * base[1] + pos % base[1]), i))
    emitted = ranked_base + [i for _, i in sorted(placed)]
    return sorted(emitted), emitted


@pytest.mark.parametrize("layout", LAYOUTS)
def test_default_matches_the_codes_rules_in_loops(layout):
    base, tile_rows, tile_cols = layout
    image = anyres_image(base, tile_rows, tile_cols, signals=("cls_logits@-1",), seed=20 + base[0])
    image.signals["cls_logits@-1"] = image.signals["cls_logits@-1"] * 3000.0  # logit-sized sums (T = 10)
    method = GlobalCom2()
    for k in range(1, image.n):
        selection = method.select(image, k)
        assert_valid_keep(selection.keep, image.n, k)
        kept, emitted = _ref_code_select(image, k, layout)
        assert selection.keep.tolist() == kept, k
        assert selection.keep[selection.order].tolist() == emitted, k


def test_block_regions_cut_the_thumbnail_into_equal_blocks():
    # a 5 x 5 thumbnail over 2 x 2 tiles: blocks of 2 x 2, the remainder row / column joins the last block
    image = anyres_image(base=(5, 5), tile_rows=(5, 3), tile_cols=(5, 5), seed=1)
    region = block_regions(anyres_mosaic(image, "test")).view(5, 5)
    expected = torch.tensor([[0, 0, 1, 1, 1]] * 2 + [[2, 2, 3, 3, 3]] * 3)
    assert torch.equal(region, expected)
    # unpadded areas differ: the short tile row covers 3 / 8 of the image's height
    assert not torch.equal(anyres_mosaic(image, "test").base_regions().view(5, 5), expected)


def test_code_counts_floor_then_reconcile():
    assert code_counts([144.0, 150.7, 140.2, 138.9, 146.2], [576] * 5, 720) == [144, 151, 140, 139, 146]
    assert code_counts([2.5, 2.5, 2.5], [3, 3, 3], 9) == [3, 3, 3]
    # floors 3, 3, 3 exceed 6: one less each time for the smallest remainder target - count (ties: earlier)
    assert code_counts([3.9, 3.9, 3.0], [3, 9, 9], 6) == [2, 2, 2]
    assert code_counts([3.9, 3.0, 3.0], [9, 9, 9], 7) == [3, 2, 2]
    assert code_counts([1.2, 1.7, 0.4], [5, 5, 5], 2) == [1, 1, 0]


def test_crop_sigma_is_the_codes_softmax():
    region = torch.tensor([0, 0, 1, 2, -1])
    thumbnail = torch.tensor([10.0, 20.0, 5.0, 0.0, 99.0])
    sums = torch.tensor([30.0, 5.0, 0.0], dtype=torch.float64)
    e = torch.exp((sums - 30.0) / 10.0)
    assert crop_sigma(region, thumbnail, 3, 10.0).tolist() == pytest.approx((e / (e.sum() + 1e-8)).tolist())


def test_cls_logits_on_a_siglip_tower_are_the_received_logits(tiny):
    """LLaVA-OneVision's SigLIP has no [CLS]: the default score, cls_logits@-1, is there the mean logit each
    patch receives (as "cls_attention" is the attention each patch receives), so the default runs."""
    import tokprune
    from tokprune.methods import make_method

    model, _ = tiny("llava_onevision", "sdpa")
    assert "cls_logits@-1" in make_method("globalcom2", {}).signals
    tokprune.apply(model, "globalcom2").remove()
    tokprune.apply(model, "globalcom2", score="attention", layer=None).remove()
