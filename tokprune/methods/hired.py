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

    What the paper states (arXiv v3: abstract, §1 contributions, Fig. 4 caption, the inputs of
    Algorithm 1): a fixed token budget is handed out in two phases. Phase 1 splits the budget between
    the full image (here: the base view) and the sub-images (here: the tiles), giving each partition a
    share by a "visual content score" read from the [CLS] attention of an early ViT layer (l_init);
    phase 2 keeps, inside every partition, the tokens with the highest "feature importance", the [CLS]
    attention of the final ViT layer (l_final), up to the partition's share. Algorithm 1 takes the
    budget N_budget, the tokens per partition N_ViT, alpha, a top-k count k, l_init, l_final, the H
    heads and every partition's per-head [CLS] attention. HiRED-20% keeps 20% of the tokens. The copy
    of the paper available when this was checked held only its opening, so the exact content-score
    formula, the head aggregation, the rounding and the default values of alpha, k, l_init and l_final
    could not be read from the paper itself: they follow the authors' code (github.com/hasanar1f/HiRED,
    llava_next/modeling_llava_next.py, `HiRED_token_selection` and `HiRED_sub_img_budgets`; its
    accuracy scripts run token_budget_rate 0.2, alpha 0.5).

    An AnyRes image is a base view (the whole image at tile resolution) plus high-resolution tiles.
    For k kept tokens of the image (base + tiles, row-end separators excluded):
      1. budget distribution: the base view gets alpha * k tokens (rounded down, at most its size); the
         tiles share the rest by their visual content score, computed from the base view's [CLS]
         attention at an early ViT layer (`early_layer`, default the first): the round(content_ratio *
         n_base) base tokens with the largest early attention mark the image's visual content (the
         code's top-k, presumably Algorithm 1's k; default content_ratio = 1 - alpha, as in the
         code), and a tile's score is the number of marked tokens inside the tile's area of the
         image. Shares are proportional to the scores, capped at each tile's size (the overflow
         re-shared), largest-remainder rounding, so exactly k tokens are kept (`allocate_quotas`);
         tiles without marked tokens get none unless the others are full;
      2. token dropping: every part (base view and each tile) keeps its top tokens by its own [CLS]
         attention at the feature layer (the layer whose output feeds the projector, the code's ViT
         layer 22 of 24 on LLaVA-NeXT; `final_layer`).
    Kept tokens stay in their original order. An image without a base view and tiles (a video clip, an
    image of a several-image LLaVA-OneVision prompt) raises an UnsupportedInputError (a ValueError) that
    says what to use instead.

    Budget mapping: default keep_ratio 0.2 = HiRED-20% (0.2 * 5 * 576 = 576 tokens of an unpadded
    2x2-tile LLaVA-NeXT image); here the ratio is of the image's content tokens after unpadding, while
    the code takes it of all partitions' 576 tokens before unpadding. alpha = 0.5 is the code's
    setting, and in the code alpha is the base view's share of the budget.

    Deliberate differences from the authors' code: (1) a base token belongs to the tile whose image area
    holds its centre, on the unpadded tile mosaic; the code gives each tile a consecutive raster slice
    of the base view (bands of whole rows, not the tile's rectangle) and picks tokens before unpadding
    (those in the padding are dropped afterwards); (2) exactly k tokens are kept: the code truncates
    every tile's share, caps it at the tile's size without re-sharing the excess, and does not give
    what the tiles cannot hold back to the base view, so it keeps fewer; (3) attention is the head mean
    (the code sums the heads: same ranking, same marked tokens); (4) ties go to the lower index; (5)
    the number of marked tokens is rounded (Python's round; the code truncates; equal for 576 base
    tokens and alpha 0.5). Needs tiles: `tokprune.apply` refuses models without them (`needs_tiles`).
    """

    name = "hired"
    family = "high-res budget (AnyRes only)"
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
