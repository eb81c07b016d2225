"""Unit tests of HiRED (tokprune/methods/hired.py) and of the AnyRes geometry it shares with GlobalCom²
(tokprune/methods/anyres.py), on hand-made base-view + tile-mosaic images.

The defaults follow the authors' code (a tile's content score counts the marked base tokens in its raster
band of the base view; the base share is counted on the padded tiles); tokprune's former defaults are
options (`FORMER`). Agreement with the authors' code on the real model class: tests/agreement/test_hired.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from anyres_images import anyres_image, anyres_units, kept_per_part, parts, ref_regions
from checks import assert_valid_keep

import tokprune
from tokprune.core.budget import Budget
from tokprune.core.layout import Unit
from tokprune.core.selection import image_view
from tokprune.errors import MethodOptionError, UnsupportedInputError, UnsupportedModelError
from tokprune.methods import REGISTRY
from tokprune.methods.anyres import anyres_mosaic
from tokprune.methods.base import ImageTokens
from tokprune.methods.hired import HiRED, base_share
from tokprune.methods.holov import allocate_quotas

SIGNALS = ("cls_attention@0", "cls_attention")
# tokprune's former defaults: a tile's score from its area of the image, the base share of the kept tokens
FORMER = dict(regions="rectangles", base_budget="content")
# (base grid, tile row heights, tile column widths): square tiles, unpadded tiles, one row of one-row
# tiles (a very wide image), a 2x1 column, a single tile, odd sides (base centres on tile borders)
LAYOUTS = [
    ((4, 4), (4, 4), (4, 4)),
    ((4, 4), (3, 3), (4, 4)),
    ((4, 4), (1,), (4, 4)),
    ((4, 4), (4, 4), (2,)),
    ((3, 3), (3,), (3,)),
    ((5, 5), (5, 5), (3, 3)),
    ((7, 7), (5, 5), (7, 7)),
]


# ------------------------------------------------------------------------------------ reference


def _ranked(indices: list[int], score: list[float]) -> list[int]:
    return sorted(indices, key=lambda i: (-score[i], i))


def _ref_bands(n_base: int, n_tiles: int) -> list[int]:
    """Tile of every base token by raster band: the last t with t * n_base // T <= token."""
    return [max(t for t in range(n_tiles) if t * n_base // n_tiles <= b) for b in range(n_base)]


def _ref_select(image: ImageTokens, k: int, layout, alpha=0.5, ratio=None, former=False) -> list[int]:
    base, tile_rows, tile_cols = layout
    units, origins = anyres_units(base, list(tile_rows), list(tile_cols))
    early, final = (image.signals[s].double().tolist() for s in SIGNALS)
    base_idx = units[0].index.tolist()
    tiles = [u.index.tolist() for u in units[1:]]
    sizes = [len(t) for t in tiles]
    n_base, n = len(base_idx), len(base_idx) + sum(sizes)
    if former:
        wanted = math.floor(alpha * k + 1e-9)
        region = ref_regions(base, origins, [u.grid for u in units[1:]], (sum(tile_rows), sum(tile_cols)))
    else:
        k_code = k * (1 + len(tiles)) * n_base // n  # k counted on the padded tiles
        wanted = int(k_code * alpha)
        region = _ref_bands(n_base, len(tiles))
    k_base = min(wanted, n_base, k)
    k_tiles = min(k - k_base, sum(sizes))
    k_base = k - k_tiles
    ratio = 1 - alpha if ratio is None else ratio
    marked = _ranked(list(range(n_base)), [early[i] for i in base_idx])[: int(ratio * n_base)]
    counts = [float(sum(region[m] == t for m in marked)) for t in range(len(tiles))]
    quotas = allocate_quotas(counts, sizes, k_tiles)
    keep = _ranked(base_idx, final)[:k_base]
    for tile, q in zip(tiles, quotas):
        keep += _ranked(tile, final)[:q]
    return sorted(keep)


# ------------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mosaic_recovers_tile_positions_and_base_regions(layout):
    base, tile_rows, tile_cols = layout
    units, origins = anyres_units(base, list(tile_rows), list(tile_cols))
    image = ImageTokens(embeds=torch.zeros(1 + int(units[-1].index.max()), 2), grid=None, units=units)
    mosaic = anyres_mosaic(image, "test")
    assert mosaic.origins == origins
    assert mosaic.size == (sum(tile_rows), sum(tile_cols))
    expected = ref_regions(base, origins, [u.grid for u in units[1:]], mosaic.size)
    assert mosaic.base_regions().tolist() == expected


def test_base_regions_are_quadrants_of_a_two_by_two_mosaic():
    units, _ = anyres_units((4, 4), [3, 3], [4, 4])  # unpadded tiles: 3 rows each
    image = ImageTokens(embeds=torch.zeros(16 + 48, 2), grid=None, units=units)
    region = anyres_mosaic(image, "test").base_regions().view(4, 4)
    assert region.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_base_bands_are_raster_runs(layout):
    base, tile_rows, tile_cols = layout
    units, _ = anyres_units(base, list(tile_rows), list(tile_cols))
    image = ImageTokens(embeds=torch.zeros(1 + int(units[-1].index.max()), 2), grid=None, units=units)
    bands = anyres_mosaic(image, "test").base_bands()
    assert bands.tolist() == _ref_bands(base[0] * base[1], len(units) - 1)
    # 24 x 24 over 2 x 2 tiles (LLaVA-NeXT): tile t gets base rows 6t .. 6t + 5
    big = anyres_units((24, 24), [24, 24], [24, 24])[0]
    image = ImageTokens(embeds=torch.zeros(576 + 48 * 48, 2), grid=None, units=big)
    rows = anyres_mosaic(image, "test").base_bands().view(24, 24)
    assert rows[:, 0].tolist() == [r // 6 for r in range(24)] and bool((rows == rows[:, :1]).all())


def test_mosaic_matches_llava_next_packing(tiny):
    """On the real adapter's layouts: tile origins and mosaic size agree with the model's own row-end
    newline tokens (row = newlines before a token, column = distance to the row start)."""
    model, _ = tiny("llava_next")
    adapter = tokprune.patches.adapter_for(model)
    sizes = [(112, 112), (112, 168), (168, 112), (224, 224), (30, 224), (224, 30), (112, 400), (3, 300)]
    layout, _ = adapter.packing(torch.tensor(sizes))
    for i, n in enumerate(layout.counts):
        local = torch.arange(n)
        view, content = image_view(layout, i, local, torch.zeros(n, 2), {}, {})
        mosaic = anyres_mosaic(view, "test")
        separators = layout.separators[i]
        n_base, big_h = mosaic.base.index.numel(), int(separators.sum())
        big_w = (n - n_base - big_h) // big_h
        assert mosaic.size == (big_h, big_w)
        newlines_before = torch.cumsum(separators.long(), 0)
        position = local[content]  # content token -> position among the image's tokens
        for tile, (r0, c0) in zip(mosaic.tiles, mosaic.origins):
            first = int(position[tile.index[0]])
            row = int(newlines_before[first])
            assert (row, first - n_base - row * (big_w + 1)) == (r0, c0), sizes[i]
        assert bool((mosaic.base_regions() >= 0).all())


def test_images_that_are_not_anyres_raise():
    """A plain image or video frames (no base view with tiles): a clear error naming the base view."""
    plain = ImageTokens(embeds=torch.zeros(16, 2), grid=(4, 4), signals={s: torch.rand(16) for s in SIGNALS})
    with pytest.raises(UnsupportedInputError, match="AnyRes image \\(a base view"):
        HiRED().select(plain, 4)
    frames = [
        Unit(index=torch.arange(8), grid=(2, 4), kind="frame"),
        Unit(torch.arange(8, 16), (2, 4), "frame"),
    ]
    with pytest.raises(UnsupportedInputError, match="'base' unit.*use a method that does not need tiles"):
        HiRED().select(ImageTokens(plain.embeds, None, plain.signals, units=frames), 4)


@pytest.mark.parametrize("method", ["hired", "globalcom2"])
@pytest.mark.parametrize("layout", ["mixed", "multi"])
def test_untiled_items_on_a_tiled_model_say_what_to_do(tiny, method, layout):
    """LLaVA-OneVision has tiles, but a video clip (or an image of a several-image prompt) has none: the
    forward fails with an UnsupportedInputError that names methods to use instead; remove() restores."""
    from tiny_onevision import onevision_batch

    model, proc = tiny("llava_onevision", "sdpa")
    inputs = onevision_batch(proc, layout)
    with torch.no_grad():
        reference = model(**inputs).logits
        with (
            tokprune.apply(model, method, keep_ratio=0.25),
            pytest.raises(
                UnsupportedInputError, match=f"{method} needs .*use a method that does not need tiles"
            ),
        ):
            model(**inputs)
        assert torch.equal(model(**inputs).logits, reference)


def test_malformed_anyres_images_raise():
    units, _ = anyres_units((2, 2), [2], [3])
    units[1] = Unit(index=units[1].index, grid=None, kind="tile")
    with pytest.raises(ValueError, match="full token grid"):
        HiRED().select(
            ImageTokens(torch.zeros(10, 2), None, {s: torch.rand(10) for s in SIGNALS}, units=units), 4
        )


# ------------------------------------------------------------------------------------ budget split


def _with_early(image: ImageTokens, base_values: dict[int, float]) -> ImageTokens:
    """Set the base view's early-layer attention: given tokens get their value, the rest tiny ones."""
    n_base = image.units[0].index.numel()
    early = torch.zeros(image.n)
    early[:n_base] = 0.001 * torch.arange(n_base, 0, -1, dtype=torch.float32) / n_base
    for i, v in base_values.items():
        early[i] = v
    image.signals["cls_attention@0"] = early
    return image


def test_budget_split_follows_early_attention_of_the_base_view():
    # base 4x4 over a 2x2 mosaic of 4x4 tiles. Default (the code): tile t's part of the base view is base row
    # t; former (regions="rectangles"): base quadrant t. With content_ratio 0.5 the 8 marked base tokens are
    # 0, 1, 4, 5 (top-left quadrant, rows 0-1), 2, 3 (row 0, top-right) and 8, 9 (row 2, bottom-left)
    image = _with_early(
        anyres_image(signals=SIGNALS, seed=1),
        {0: 1.0, 1: 1.0, 4: 1.0, 5: 1.0, 2: 0.5, 3: 0.5, 8: 0.5, 9: 0.5},
    )
    # rows: 4, 2, 2, 0 marked; quadrants: 4, 2, 2, 0 as well
    for options in ({}, FORMER):
        keep = HiRED(alpha=0.5, content_ratio=0.5, **options).select(image, 16).keep
        assert kept_per_part(image, keep) == [8, 4, 2, 2, 0]  # base alpha * 16, tiles 8 shared 4:2:2:0
        # default content_ratio = 1 - alpha: here also 8 marked tokens
        assert torch.equal(HiRED(alpha=0.5, **options).select(image, 16).keep, keep)
    # all marked tokens in the top-left quadrant = rows 0 and 1: by bands tiles 0 and 1 share, by area tile 0
    image = _with_early(anyres_image(signals=SIGNALS, seed=2), {0: 1.0, 1: 1.0, 4: 1.0, 5: 1.0})
    keep = HiRED(alpha=0.5, content_ratio=0.25).select(image, 20).keep
    assert kept_per_part(image, keep) == [10, 5, 5, 0, 0]
    keep = HiRED(alpha=0.5, content_ratio=0.25, **FORMER).select(image, 20).keep
    assert kept_per_part(image, keep) == [10, 10, 0, 0, 0]


def test_base_share_is_counted_on_the_padded_tiles():
    """Unpadded tiles (3 of 4 rows each): the code takes alpha of its budget over the padded 5 x 16
    tokens; k = 20 of the 64 content tokens is k_code = 20 * 80 // 64 = 25 there, base share int(12.5)."""
    image = anyres_image(tile_rows=(3, 3), signals=SIGNALS, seed=7)
    assert kept_per_part(image, HiRED().select(image, 20).keep)[0] == 12
    assert kept_per_part(image, HiRED(base_budget="content").select(image, 20).keep)[0] == 10


def test_alpha_is_the_base_views_share():
    image = anyres_image(signals=SIGNALS, seed=3)
    assert kept_per_part(image, HiRED(alpha=0.0).select(image, 20).keep)[0] == 0
    assert kept_per_part(image, HiRED(alpha=1.0).select(image, 20).keep)[0] == 16  # all it holds
    assert kept_per_part(image, HiRED(alpha=1.0).select(image, 12).keep) == [12, 0, 0, 0, 0]
    assert kept_per_part(image, HiRED(alpha=0.25).select(image, 41).keep)[0] == 10  # floor(10.25)


def test_full_tiles_pass_their_overflow_on():
    # every marked token in tile 0; 44 tile tokens: tile 0 is full (16), the other 28 go by size
    image = _with_early(anyres_image(signals=SIGNALS, seed=4), {0: 1.0, 1: 1.0, 4: 1.0, 5: 1.0})
    keep = HiRED(alpha=0.5, content_ratio=0.25, **FORMER).select(image, 60).keep
    assert kept_per_part(image, keep) == [16, 16, 10, 9, 9]
    # by bands the marked tokens lie in rows 0 and 1 (tiles 0 and 1, 2 each): both full, 12 left by size
    keep = HiRED(alpha=0.5, content_ratio=0.25).select(image, 60).keep
    assert kept_per_part(image, keep) == [16, 16, 16, 6, 6]


def test_base_share_sums_to_k():
    assert base_share(20, 0.5, 16, [16, 16]) == (10, 10)
    assert base_share(21, 0.5, 16, [16, 16]) == (10, 11)
    assert base_share(40, 0.5, 16, [16, 16]) == (16, 24)  # base capped at its size
    assert base_share(40, 0.1, 16, [16, 16]) == (8, 32)  # tiles capped: the rest returns to the base
    # counted on the padded tiles: 3 x 16 = 48 tower tokens, 40 content tokens; k_code = 20 * 48 // 40 = 24
    assert base_share(20, 0.5, 16, [12, 12], padded=48) == (12, 8)
    assert base_share(20, 0.5, 16, [12, 12]) == (10, 10)
    assert base_share(20, 0.5, 16, [16, 16], padded=48) == (10, 10)  # nothing unpadded: the same
    assert base_share(40, 0.57, 16, [12, 12], padded=48) == (16, 24)
    assert base_share(100, 0.57, 100, [100], padded=200) == (56, 44)  # int(0.57 * 100) = 56, as the code
    for k in range(1, 48):
        for alpha in (0.0, 0.3, 0.5, 1.0):
            for padded in (None, 48):
                k_base, k_tiles = base_share(k, alpha, 16, [16, 16], padded)
                assert k_base + k_tiles == k and 0 <= k_base <= 16 and 0 <= k_tiles <= 32
    for k in range(1, 41):
        k_base, k_tiles = base_share(k, 0.5, 16, [12, 12], padded=48)
        assert k_base + k_tiles == k and 0 <= k_base <= 16 and 0 <= k_tiles <= 24


# ------------------------------------------------------------------------------------ selection


def test_tokens_inside_every_part_are_its_top_by_final_attention():
    image = anyres_image(base=(5, 5), tile_rows=(5, 5), tile_cols=(3, 3), signals=SIGNALS, seed=5)
    keep = set(HiRED().select(image, 23).keep.tolist())
    final = image.signals["cls_attention"]
    for idx in parts(image):
        kept = [i for i in idx.tolist() if i in keep]
        dropped = [i for i in idx.tolist() if i not in keep]
        if kept and dropped:
            assert min(final[kept]) >= max(final[dropped])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("alpha,ratio", [(0.5, None), (0.2, None), (0.7, 0.3), (0.0, 1.0)])
@pytest.mark.parametrize("former", [False, True])
def test_exactly_k_and_matches_loop_reference(layout, alpha, ratio, former):
    base, tile_rows, tile_cols = layout
    image = anyres_image(base, tile_rows, tile_cols, signals=SIGNALS, seed=len(tile_rows) + base[0])
    method = HiRED(alpha=alpha, content_ratio=ratio, **(FORMER if former else {}))
    for k in range(1, image.n):
        selection = method.select(image, k)
        assert_valid_keep(selection.keep, image.n, k)
        assert selection.order is None  # the code emits base view, then the mosaic, in token order
        assert selection.keep.tolist() == _ref_select(image, k, layout, alpha, ratio, former), k


def test_float16_signals_and_layer_options():
    image = anyres_image(signals=("cls_attention@2", "cls_attention@-1"), seed=6)
    image.signals = {name: value.half() for name, value in image.signals.items()}
    method = HiRED(early_layer=2, final_layer=-1)
    assert method.signals == ("cls_attention@2", "cls_attention@-1")
    assert_valid_keep(method.select(image, 17).keep, image.n, 17)


# ------------------------------------------------------------------------------------ registry / api


def test_metadata_and_options():
    assert REGISTRY["hired"] is HiRED
    assert HiRED.where == "pre" and HiRED.needs_tiles and not HiRED.spatial
    assert HiRED.default_budget == Budget(ratio=0.2)
    assert HiRED.code_families == ("llava_next",)
    method = HiRED()
    assert (method.alpha, method.early_layer, method.final_layer, method.content_ratio) == (
        0.5,
        0,
        None,
        None,
    )
    assert (method.regions, method.base_budget) == ("bands", "padded")
    with pytest.raises(MethodOptionError, match=r"hired: regions must be one of \('bands', 'rectangles'\)"):
        HiRED(regions="quadrants")
    with pytest.raises(MethodOptionError, match=r"hired: base_budget must be one of \('padded', 'content'\)"):
        HiRED(base_budget="x")
    assert method.signals == ("cls_attention@0", "cls_attention")
    bad = [
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"alpha": "half"},
        {"alpha": True},
        {"content_ratio": 2},
        {"early_layer": 1.5},
        {"early_layer": None},
        {"final_layer": "last"},
    ]
    for options in bad:
        with pytest.raises(MethodOptionError):
            HiRED(**options)


@pytest.mark.parametrize("method", ["hired", "globalcom2"])
def test_apply_refuses_models_without_tiles(tiny, method):
    model, _ = tiny("llava")
    with pytest.raises(UnsupportedModelError, match="LlavaNextForConditionalGeneration") as info:
        tokprune.apply(model, method)
    assert "LlavaForConditionalGeneration has no tiles" in str(info.value)
    assert not hasattr(model, "_tokprune_pruner")
    with pytest.raises(UnsupportedModelError):  # also when composed with an in-LLM method
        tokprune.apply(model, [method, "fastv"])


def test_cli_default_method_lists_skip_anyres_methods_on_models_without_tiles(tiny):
    from tokprune import cli

    everything = tokprune.available_methods()
    plain = cli._runnable(everything, tiny("llava")[0])
    assert "hired" not in plain and "globalcom2" not in plain and "fastv" in plain
    assert cli._runnable(everything, tiny("llava_next")[0]) == everything
