"""HiRED: the budget of an AnyRes image is shared between its base view and its tiles by early-layer
[CLS] attention; the feature layer's [CLS] attention picks the tokens inside every part."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.anyres import Mosaic, anyres_mosaic
from tokprune.methods.base import (
    ImageTokens,
    Method,
    Selection,
    topk_sorted,
    trivial_selection,
    vision_signal,
)
from tokprune.methods.holov import allocate_quotas
from tokprune.methods.options import check_number, check_vision_layer


def base_share(k: int, alpha: float, n_base: int, tile_sizes: list[int]) -> tuple[int, int]:
    """(tokens kept in the base view, tokens kept in the tiles) for k kept tokens of the image.

    The base view gets floor(alpha * k), at most its size; the tiles the rest, at most their size (what
    they cannot hold goes back to the base view). The two sum to k for every k <= n_base + sum(tiles).
    """
    k_tiles = min(k - min(math.floor(alpha * k + 1e-9), n_base), sum(tile_sizes))
    return k - k_tiles, k_tiles


def content_scores(mosaic: Mosaic, early: torch.Tensor, marked: int) -> list[float]:
    """Visual content score of every tile: how many of the `marked` base-view tokens with the largest
    early-layer [CLS] attention lie in the tile's area (`Mosaic.base_regions`).

    early: (n_base,) early-layer attention of the base view's tokens, row-major.
    """
    region = mosaic.base_regions().to(early.device)
    top = topk_sorted(early, marked)
    counts = torch.zeros(len(mosaic.tiles), dtype=torch.float32, device=early.device)
    counts.index_add_(0, region[top], torch.ones(top.numel(), device=early.device))
    return counts.tolist()


@dataclass
class HiRED(Method):
    """HiRED — Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
    High-Resolution Vision-Language Models", AAAI 2025 (arXiv:2408.10945). AnyRes models only.

    An AnyRes image is a base view (the whole image at tile resolution, the paper's "full image") plus
    high-resolution tiles ("sub-images"). For k kept tokens of the image (base + tiles, row-end
    separators excluded):
      1. budget distribution: the base view gets alpha * k tokens (rounded down, at most its size); the
         tiles share the rest by their visual content score, computed from the base view's [CLS]
         attention at an early ViT layer (`early_layer`, default the first): the round(content_ratio *
         n_base) base tokens with the largest early attention mark the image's visual content, and a
         tile's score is the number of marked tokens inside the tile's area of the image. Shares are
         proportional to the scores, capped at each tile's size (the overflow re-shared), largest-
         remainder rounding, so exactly k tokens are kept (`allocate_quotas`); tiles without marked
         tokens get none unless the others are full;
      2. token dropping: every part (base view and each tile) keeps its top tokens by its own [CLS]
         attention at the feature layer (the layer whose output feeds the projector; `final_layer`).
    Kept tokens stay in their original order. An image without a base view and tiles (a video clip, an
    image of a several-image LLaVA-OneVision prompt) raises a ValueError.

    Budget mapping: the published HiRED-20% keeps 20% of the image's tokens (0.2 * 5 * 576 = 576 of a
    2x2-tile LLaVA-NeXT image) = default keep_ratio 0.2; alpha = 0.5 (the published setting) is the
    base view's share of the budget. Layers follow the authors' public code: ViT layer 0 for the budget
    split and layer 22 of 24 (LLaVA-NeXT's feature layer) for selection; the code marks content with the
    top (1 - alpha) * 576 base tokens, the default here (content_ratio=None).

    Deliberate differences from the authors' code: (1) a base token belongs to the tile whose image area
    holds its centre, on the unpadded tile mosaic; the code gives each tile a consecutive raster slice
    of the base view (bands of whole rows, not the tile's rectangle) and picks tokens before unpadding
    (those in the padding are dropped afterwards); (2) exactly k tokens are kept (the code truncates
    every tile's share, keeping fewer); (3) attention is the head mean (the code sums heads: same
    ranking); (4) ties go to the lower index. The paper's text was not at hand when this was written:
    alpha, the layers and the content score follow the authors' code and the paper's summary (early-
    layer [CLS] attention shares the budget across partitions, final-layer attention picks tokens).
    Needs tiles: `tokprune.apply` refuses models without them (`needs_tiles`).
    """

    name = "hired"
    where = "pre"
    default_budget = Budget(ratio=0.2)
    paper = "Arif et al., AAAI 2025 (HiRED, arXiv:2408.10945)"
    needs_tiles = True

    alpha: float = 0.5
    early_layer: int = 0
    final_layer: int | None = None
    content_ratio: float | None = None

    def __post_init__(self) -> None:
        check_number(self, "alpha", 0, 1)
        check_number(self, "content_ratio", 0, 1, optional=True)
        check_vision_layer(self, "early_layer")
        check_vision_layer(self, "final_layer", optional=True)

    @property
    def early_signal(self) -> str:
        return f"cls_attention@{self.early_layer}"

    @property
    def final_signal(self) -> str:
        return vision_signal("cls_attention", self.final_layer)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.early_signal, self.final_signal)

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        device = image.embeds.device
        final = image.signals[self.final_signal].to(device).float().reshape(-1)
        mosaic = anyres_mosaic(image, self.name)
        base = mosaic.base.index.to(device)
        tiles = [t.index.to(device) for t in mosaic.tiles]
        sizes = [t.numel() for t in tiles]
        k_base, k_tiles = base_share(k, self.alpha, base.numel(), sizes)
        ratio = 1.0 - self.alpha if self.content_ratio is None else self.content_ratio
        early = image.signals[self.early_signal].to(device).float().reshape(-1)[base]
        weights = content_scores(mosaic, early, round(ratio * base.numel()))
        quotas = allocate_quotas(weights, sizes, k_tiles)
        parts = [base, *tiles]
        kept = [idx[topk_sorted(final[idx], q)] for idx, q in zip(parts, [k_base, *quotas])]
        return Selection(keep=torch.cat(kept).sort().values)
