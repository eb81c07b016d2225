"""Unit tests of GlobalCom² (tokprune/methods/globalcom2.py) on hand-made base-view + tile-mosaic images.

The reference recomputes the selection with Python loops in float64: crop areas by exact fractions,
the thumbnail's map resized by explicit bilinear weights (half-pixel centres, edges clamped).
"""

from __future__ import annotations

import math

import pytest
import torch
from anyres_images import anyres_image, anyres_units, kept_per_part, parts, ref_regions
from checks import assert_valid_keep

from tokprune.core.budget import Budget, split_budget
from tokprune.errors import MethodOptionError
from tokprune.methods import REGISTRY
from tokprune.methods.anyres import anyres_mosaic
from tokprune.methods.base import ImageTokens
from tokprune.methods.globalcom2 import GlobalCom2, crop_weights, global_crop_scores
from tokprune.methods.holov import allocate_quotas

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
    keep = GlobalCom2().select(image, 40).keep
    assert kept_per_part(image, keep) == [8, 14, 6, 6, 6]
    # half in quadrant 0, half in quadrant 3 at a high temperature: sigma ≈ uniform -> shares by size
    image = _thumbnail(anyres_image(seed=2), {0: 0.5, 15: 0.5})
    assert kept_per_part(image, GlobalCom2(temperature=1e9).select(image, 40).keep) == [8, 8, 8, 8, 8]


def test_uniform_ratios_give_crops_their_size_share():
    image = anyres_image(tile_rows=(4, 4), tile_cols=(4, 2), seed=3)  # crops of 16, 8, 16, 8 tokens
    keep = GlobalCom2(temperature=1e9).select(image, 30).keep
    # thumbnail: 30 * 16/64 = 7.5 -> 8 (tie to the first part); crops 22 by size: 7.33, 3.67, 7.33, 3.67
    assert kept_per_part(image, keep) == [8, 7, 4, 7, 4]


def test_unequal_crops_keep_the_papers_ratio_proportions():
    # crops of 16, 8, 16, 8 tokens; all thumbnail attention in crop 0's area: sigma ≈ (1, 0, 0, 0), so the
    # paper's ratios r_j = R (1 + sigma_j - 1/4) stand as 1.75 : 0.75 : 0.75 : 0.75. k = 35: thumbnail
    # 8.75 -> 9, crops 26; counts ∝ size * ratio = 28 : 6 : 12 : 6 (sum 52), i.e. 14, 3, 6, 3 for 26
    image = _thumbnail(anyres_image(tile_rows=(4, 4), tile_cols=(4, 2), seed=10), {0: 1.0})
    keep = GlobalCom2().select(image, 35).keep
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
        keep = GlobalCom2().select(image, k).keep
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
    keep = GlobalCom2(alpha=1.0, temperature=1e9).select(image, 20).keep  # thumbnail 4, crops 4 each
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
        keep = GlobalCom2(alpha=alpha, temperature=1e9).select(image, 5).keep
        assert kept_per_part(image, keep) == [1, 1, 1, 1, 1]
        assert keep[torch.isin(keep, crop0)].tolist() == [int(crop0[expected])], alpha


def test_alpha_zero_ranks_crop_tokens_by_their_own_attention():
    image = anyres_image(seed=7)
    keep = set(GlobalCom2(alpha=0.0).select(image, 37).keep.tolist())
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
    method = GlobalCom2(temperature=temperature, alpha=alpha)
    for k in range(1, image.n):
        keep = method.select(image, k).keep
        assert_valid_keep(keep, image.n, k)
        assert keep.tolist() == _ref_select(image, k, layout, temperature, alpha), k


def test_float16_signals_plain_images_and_layer_option():
    image = anyres_image(signals=("cls_attention@-1",), seed=9)
    image.signals = {name: value.half() for name, value in image.signals.items()}
    method = GlobalCom2(layer=-1)
    assert method.signals == ("cls_attention@-1",)
    assert_valid_keep(method.select(image, 21).keep, image.n, 21)
    plain = ImageTokens(embeds=torch.zeros(16, 2), grid=(4, 4), signals={"cls_attention": torch.rand(16)})
    with pytest.raises(ValueError, match="AnyRes"):
        GlobalCom2().select(plain, 4)


def test_metadata_and_options():
    assert REGISTRY["globalcom2"] is GlobalCom2
    assert GlobalCom2.where == "pre" and GlobalCom2.needs_tiles and not GlobalCom2.spatial
    assert GlobalCom2.default_budget == Budget(ratio=0.25)
    method = GlobalCom2()
    assert (method.temperature, method.alpha, method.layer) == (0.1, 0.5, None)
    assert method.signals == ("cls_attention",)
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
