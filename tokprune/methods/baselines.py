"""Baselines: a seeded random subset and spatial average pooling to the budget."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection
from tokprune.methods.options import check_int


@dataclass
class RandomPrune(Method):
    """Uniform random subset of each image's tokens (a strong baseline per UniPruneBench).

    A generator seeded with `seed` is drawn anew for every image, so the same image and budget always
    keep the same tokens, whatever else is in the batch.
    """

    name = "random"
    family = "baseline"
    default_budget = Budget(ratio=0.25)
    paper = "baseline (UniPruneBench, 2025)"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self, "seed")

    def select(self, image: ImageTokens, k: int) -> Selection:
        generator = torch.Generator().manual_seed(self.seed)
        keep = torch.randperm(image.n, generator=generator)[:k].sort().values
        return Selection(keep=keep.to(image.embeds.device))


def pooling_cells(h: int, w: int, k: int) -> list[tuple[range, range]]:
    """Split an h x w grid into exactly k disjoint rectangular cells in raster order (k <= h * w).

    Rows are split into r bands (r close to sqrt(k * h / w), so cells stay roughly square); band i is
    split into k // r or k // r + 1 column bins.
    """
    r = min(h, k, max(math.ceil(k / w), round(math.sqrt(k * h / w)), 1))
    per_band = [k // r + (1 if i < k % r else 0) for i in range(r)]
    cells = []
    for i, cols in enumerate(per_band):
        rows = range(i * h // r, (i + 1) * h // r)
        cells += [(rows, range(j * w // cols, (j + 1) * w // cols)) for j in range(cols)]
    return cells


@dataclass
class SpatialPool(Method):
    """Spatial average pooling of the token grid down to exactly the budget.

    The grid is cut into `k` near-square cells (see `pooling_cells`); each cell becomes one token: its
    embedding is the mean of the cell, placed at the cell's centre token (whose position id it keeps).
    Without a grid (e.g. a [CLS] token among the features) the tokens are pooled as a 1 x n strip.
    """

    name = "pool"
    family = "baseline"
    default_budget = Budget(ratio=0.25)
    paper = "baseline: spatial average pooling"
    spatial = True

    def select(self, image: ImageTokens, k: int) -> Selection:
        h, w = image.grid or (1, image.n)
        cell_of_token, centres = pooling_assignment(h, w, k)
        device = image.embeds.device
        cell_of_token = cell_of_token.to(device)
        sums = torch.zeros(k, image.embeds.shape[-1], device=device).index_add_(
            0, cell_of_token, image.embeds.float()
        )
        sizes = torch.bincount(cell_of_token, minlength=k).float()
        merged = (sums / sizes[:, None]).to(image.embeds.dtype)
        return Selection(keep=centres.to(device), merged=merged)


@functools.lru_cache(maxsize=256)
def pooling_assignment(h: int, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell index of every token (h*w,), centre token of every cell (k,)) for `pooling_cells`, cached."""
    cell_of_token = torch.empty(h * w, dtype=torch.long)
    centres = []
    for cell, (rows, cols) in enumerate(pooling_cells(h, w, k)):
        for r in rows:
            cell_of_token[r * w + cols.start : r * w + cols.stop] = cell
        centres.append(rows[len(rows) // 2] * w + cols[len(cols) // 2])
    return cell_of_token, torch.tensor(centres, dtype=torch.long)
