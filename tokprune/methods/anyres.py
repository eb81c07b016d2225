"""Geometry of an AnyRes image as a method sees it: one base (thumbnail) view and a mosaic of tiles.

LLaVA-NeXT lays an image out as [base view grid | the high-resolution tiles, unpadded, in raster order over
the whole tile mosaic]. A method gets the image's content tokens (row-end separators left out) and the
units (`ImageTokens.units`): the base unit and one unit per tile, each with its token indices and grid.
`anyres_mosaic` recovers where every tile sits in the mosaic from those indices alone, and which tile's
area every base-view token falls in, so that thumbnail-guided methods (HiRED, GlobalCom²) can relate the
two views: the base view shows the whole image and the unpadded mosaic covers the whole image, so both
are mapped onto the unit square.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from tokprune.core.layout import Unit
from tokprune.errors import UnsupportedInputError
from tokprune.methods.base import ImageTokens


@dataclass
class Mosaic:
    """An AnyRes image split into its base view and its tiles.

    base: the base-view unit; tiles: the tile units, in the order of `ImageTokens.units`;
    origins: (row, col) of every tile's top-left token in the tile mosaic; size: (H, W) of the mosaic
    (tokens; every tile's grid (h, w) sits at rows origin[0] .. origin[0] + h - 1 and likewise columns).
    """

    base: Unit
    tiles: list[Unit]
    origins: list[tuple[int, int]]
    size: tuple[int, int]

    def base_regions(self) -> torch.Tensor:
        """(n_base,) long: for every base-view token (row-major), the tile whose area holds its centre.

        Base token (i, j) of an S_h x S_w view has its centre at ((i + 0.5) / S_h, (j + 0.5) / S_w) of the
        image; tile t covers rows [r_t / H, (r_t + h_t) / H) and columns [c_t / W, (c_t + w_t) / W).
        Compared in integers, so that a centre on a border goes to the lower-right tile deterministically.
        """
        s_h, s_w = self.base.grid
        big_h, big_w = self.size
        device = self.base.index.device
        rows = 2 * torch.arange(s_h, device=device) + 1  # 2 * centre * S_h
        cols = 2 * torch.arange(s_w, device=device) + 1
        region = torch.full((s_h, s_w), -1, dtype=torch.long, device=device)
        for t, (tile, (r0, c0)) in enumerate(zip(self.tiles, self.origins)):
            h, w = tile.grid
            in_rows = (rows * big_h >= 2 * r0 * s_h) & (rows * big_h < 2 * (r0 + h) * s_h)
            in_cols = (cols * big_w >= 2 * c0 * s_w) & (cols * big_w < 2 * (c0 + w) * s_w)
            region[in_rows[:, None] & in_cols[None, :]] = t
        return region.reshape(-1)

    def base_bands(self) -> torch.Tensor:
        """(n_base,) long: for every base-view token (row-major), the tile whose *raster band* holds it, as
        HiRED's code assigns them: the base view's n_base tokens in raster order are cut into T consecutive
        runs, one per tile in tile order, run t = [t * n_base // T, (t + 1) * n_base // T) (equal runs of
        whole rows on LLaVA-NeXT: 576 tokens over 2 or 4 tiles). Not the tile's area of the image."""
        n, t = self.base.index.numel(), len(self.tiles)
        device = self.base.index.device
        bounds = torch.tensor([i * n // t for i in range(1, t)], dtype=torch.long, device=device)
        return torch.bucketize(torch.arange(n, device=device), bounds, right=True)


_WHAT_TO_DO = (
    "On this model {method} only prunes single images that get tiles; for prompts with video clips or "
    "several images (which LLaVA-OneVision encodes as base views only), use a method that does not need "
    "tiles (e.g. 'fastervlm', 'visionzip', 'holov'), or send such prompts unpruned."
)


def anyres_mosaic(image: ImageTokens, method: str) -> Mosaic:
    """The base view and tile mosaic of one AnyRes image.

    Raises UnsupportedInputError (a ValueError) when the image is not one (no units, or units that are not
    one base view and tiles: a video clip, a base-only view), saying what to use instead; ValueError when
    the units are malformed (a unit without a full grid, tiles that form no raster mosaic).

    Needs exactly one unit of kind "base" and at least one of kind "tile", all with grids. The tile
    mosaic is rebuilt from the tiles' token indices: ranked among all tile tokens, a tile at mosaic
    (r, c) of width W holds ranks (r + i) * W + c + j. W is the first prefix sum of the widths of the
    tiles (ordered by their first token) for which every tile satisfies that raster rule. When every
    tile is a single token row, the indices cannot tell a row of tiles from a column; such tiles come
    from unpadding a very wide image, so they are taken as one row.
    """
    units = image.units
    if not units:
        raise UnsupportedInputError(
            f"{method} needs an AnyRes image (a base view and high-resolution tiles, ImageTokens.units); "
            f"this image has no units. {_WHAT_TO_DO.format(method=method)}"
        )
    bases = [u for u in units if u.kind == "base"]
    tiles = [u for u in units if u.kind == "tile"]
    if len(bases) != 1 or not tiles or len(bases) + len(tiles) != len(units):
        kinds = [u.kind for u in units]
        raise UnsupportedInputError(
            f"{method} needs one 'base' unit and at least one 'tile' unit (an AnyRes image), got kinds "
            f"{kinds}: a video clip, or an image the model encodes without tiles. "
            f"{_WHAT_TO_DO.format(method=method)}"
        )
    for unit in units:
        if unit.grid is None or unit.grid[0] * unit.grid[1] != unit.index.numel():
            raise ValueError(f"{method}: every unit needs a full token grid, got {unit.grid} for {unit.kind}")
    origins, size = _tile_origins(tiles, method)
    return Mosaic(base=bases[0], tiles=tiles, origins=origins, size=size)


def _tile_origins(tiles: list[Unit], method: str) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """((row, col) of every tile in the mosaic, (H, W)) from the tiles' token indices."""
    positions = torch.cat([t.index for t in tiles]).sort().values
    ranks = [torch.searchsorted(positions, t.index) for t in tiles]
    firsts = [int(r[0]) for r in ranks]
    total = positions.numel()
    order = sorted(range(len(tiles)), key=lambda t: firsts[t])
    if all(t.grid[0] == 1 for t in tiles):
        widths = [total]
    else:
        widths = list(itertools.accumulate(tiles[t].grid[1] for t in order))
    for width in widths:
        if total % width == 0 and _is_raster(tiles, ranks, firsts, width):
            origins = [divmod(first, width) for first in firsts]
            return origins, (total // width, width)
    raise ValueError(f"{method}: the tiles of this image do not form a raster mosaic")


def _is_raster(tiles: list[Unit], ranks: list[torch.Tensor], firsts: list[int], width: int) -> bool:
    """Whether every tile holds the ranks of an h x w block at its first token in a mosaic `width` wide."""
    for tile, rank, first in zip(tiles, ranks, firsts):
        h, w = tile.grid
        r0, c0 = divmod(first, width)
        if c0 + w > width:
            return False
        rows = torch.arange(h, device=rank.device)[:, None]
        cols = torch.arange(w, device=rank.device)[None, :]
        if not torch.equal(rank, ((r0 + rows) * width + c0 + cols).reshape(-1)):
            return False
    return True
