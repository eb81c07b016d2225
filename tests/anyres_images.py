"""Hand-made AnyRes images (base view + tile mosaic, LLaVA-NeXT token order) for the method tests."""

from __future__ import annotations

from fractions import Fraction

import torch

from tokprune.core.layout import Unit
from tokprune.methods.base import ImageTokens


def anyres_units(
    base: tuple[int, int], tile_rows: list[int], tile_cols: list[int]
) -> tuple[list[Unit], list[tuple[int, int]]]:
    """Units of an image laid out as [base grid | tile mosaic in raster order], no separators.

    tile_rows / tile_cols: heights of the tile rows and widths of the tile columns (unpadded tiles are
    shorter / narrower). Returns (units: base first, then tiles in raster order of the tile grid,
    origins (row, col) of every tile in the mosaic).
    """
    n_base = base[0] * base[1]
    units = [Unit(index=torch.arange(n_base), grid=base, kind="base")]
    width = sum(tile_cols)
    origins = []
    r0 = 0
    for h in tile_rows:
        c0 = 0
        for w in tile_cols:
            rows = torch.arange(r0, r0 + h)[:, None]
            cols = torch.arange(c0, c0 + w)[None, :]
            units.append(Unit(index=(n_base + rows * width + cols).reshape(-1), grid=(h, w), kind="tile"))
            origins.append((r0, c0))
            c0 += w
        r0 += h
    return units, origins


def anyres_image(
    base: tuple[int, int] = (4, 4),
    tile_rows: tuple[int, ...] = (4, 4),
    tile_cols: tuple[int, ...] = (4, 4),
    signals: tuple[str, ...] = ("cls_attention",),
    seed: int = 0,
    d: int = 8,
) -> ImageTokens:
    """An AnyRes image with random embeddings and random softmax-like values for every signal."""
    units, _ = anyres_units(base, list(tile_rows), list(tile_cols))
    n = base[0] * base[1] + sum(tile_rows) * sum(tile_cols)
    g = torch.Generator().manual_seed(seed)
    values = {}
    for name in signals:
        a = torch.rand(n, generator=g) ** 3
        values[name] = a / a.sum()
    return ImageTokens(embeds=torch.randn(n, d, generator=g), grid=None, signals=values, units=units)


def parts(image: ImageTokens) -> list[torch.Tensor]:
    """Token indices of the base view, then of every tile."""
    return [u.index for u in image.units]


def kept_per_part(image: ImageTokens, keep: torch.Tensor) -> list[int]:
    return [int(torch.isin(idx, keep).sum()) for idx in parts(image)]


def ref_regions(base, origins, grids, size) -> list[int]:
    """Tile of every base token by exact fractions: centre ((i + 1/2) / S_h, (j + 1/2) / S_w) in
    [r0 / H, (r0 + h) / H) x [c0 / W, (c0 + w) / W)."""
    (s_h, s_w), (big_h, big_w) = base, size
    region = []
    for i in range(s_h):
        for j in range(s_w):
            y, x = Fraction(2 * i + 1, 2 * s_h), Fraction(2 * j + 1, 2 * s_w)
            owners = [
                t
                for t, ((r0, c0), (h, w)) in enumerate(zip(origins, grids))
                if Fraction(r0, big_h) <= y < Fraction(r0 + h, big_h)
                and Fraction(c0, big_w) <= x < Fraction(c0 + w, big_w)
            ]
            assert len(owners) == 1
            region.append(owners[0])
    return region
