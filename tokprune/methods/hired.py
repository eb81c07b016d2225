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
from tokprune.methods.options import check_choice, check_number, check_vision_layer

_REGIONS = ("bands", "rectangles")
_BASE_BUDGETS = ("padded", "content")


def base_share(
    k: int, alpha: float, n_base: int, tile_sizes: list[int], padded: int | None = None
) -> tuple[int, int]:
    """(tokens kept in the base view, tokens kept in the tiles) for k kept tokens of the image.

    padded None: the base view gets floor(alpha * k). padded = the image's ViT tokens before unpadding,
    (1 + T) * n_base: the base view gets int(alpha * k_code), its share of the budget the authors' code
    counts on the padded tiles, k_code = floor(k * padded / n) with n = n_base + sum(tile_sizes) the content
    tokens (k_code = k when nothing is unpadded). Either way at most its size and at most k; the tiles get
    the rest, at most their size (what they cannot hold goes back to the base view). The two sum to k for
    every k <= n.
    """
    n = n_base + sum(tile_sizes)
    wanted = math.floor(alpha * k + 1e-9) if padded is None else int((k * padded // n) * alpha)
    k_tiles = min(k - min(wanted, n_base, k), sum(tile_sizes))
    return k - k_tiles, k_tiles


def content_scores(
    mosaic: Mosaic, early: torch.Tensor, marked: int, regions: str = "rectangles"
) -> list[float]:
    """Visual content score of every tile: how many of the `marked` base-view tokens with the largest
    early-layer [CLS] attention lie in the tile's part of the base view: its raster band
    (`Mosaic.base_bands`, regions="bands", the authors' code) or its area of the image
    (`Mosaic.base_regions`, regions="rectangles").

    early: (n_base,) early-layer attention of the base view's tokens, row-major.
    """
    region = (mosaic.base_bands() if regions == "bands" else mosaic.base_regions()).to(early.device)
    top = topk_sorted(early, marked)
    counts = torch.zeros(len(mosaic.tiles), dtype=torch.float32, device=early.device)
    counts.index_add_(0, region[top], torch.ones(top.numel(), device=early.device))
    return counts.tolist()


@dataclass
class HiRED(Method):
    """HiRED — Arif et al., "HiRED: Attention-Guided Token Dropping for Efficient Inference of
    High-Resolution Vision-Language Models", AAAI 2025 (arXiv:2408.10945). AnyRes models only.

    The paper (arXiv v3: abstract, §1, Fig. 4, the inputs of Algorithm 1) hands a fixed token budget out
    in two phases: the full image and the sub-images get shares by a "visual content score" from the
    [CLS] attention of an early ViT layer, then every partition keeps its top tokens by the [CLS]
    attention of the final layer. The formulas and defaults follow the authors' code
    (github.com/hasanar1f/HiRED, commit 502d6dd7,
    transformers/src/transformers/models/llava_next/modeling_llava_next.py: `HiRED_token_selection`,
    `HiRED_sub_img_budgets`, `pack_HiRED_image_features`; accuracy scripts: token_budget_rate 0.2,
    alpha 0.5).

    The defaults do what that code does. An AnyRes image is a base view (the whole image at tile
    resolution) plus T high-resolution tiles; for k kept tokens of the image (base + tiles, row-end
    separators excluded):
      1. base share (`base_share`, base_budget="padded"): the base view gets int(alpha * k_code) tokens,
         at most its size, where k_code is k counted on the tiles before unpadding (the code takes its
         budget rate of all (1 + T) * 576 tower tokens: k_code = floor(k * (1 + T) * n_base / n), = k when
         nothing is unpadded); the tiles share the rest;
      2. content scores (`content_scores`, regions="bands"): the int(content_ratio * n_base) base tokens
         with the largest [CLS] attention at ViT layer `early_layer` (0) are marked (content_ratio
         defaults to 1 - alpha, as in the code); tile t's score is the number of marked tokens in the
         t-th of T consecutive raster runs of the base view (tiles in tile order: on a 2 x 2 mosaic tile
         t gets base rows 6t .. 6t + 5, not its quadrant);
      3. tile shares: proportional to the scores, capped at each tile's size with the overflow re-shared,
         largest remainder (`allocate_quotas`); the code truncates each share (int) and caps it at 576
         without re-sharing, so these shares are the code's plus the tokens it leaves unspent;
      4. every part (base view and each tile) keeps its top tokens by its own [CLS] attention at the
         feature layer (`final_layer`, default the layer whose output feeds the projector: the code's ViT
         layer 22 of 24 on LLaVA-NeXT).
    Kept tokens stay in order: base view, then the tile mosaic in raster order, as the code packs them
    (it leaves out the newline tokens, as tokprune does when an image loses tokens). An image without a
    base view and tiles (a video clip, an image of a several-image LLaVA-OneVision prompt) raises an
    UnsupportedInputError (a ValueError) saying what to use instead. On LLaVA-1.5 the code's
    single-partition version (modeling_llava.py) is a plain top-k by layer-22 [CLS] attention: use
    "fastervlm" there.

    Budget: default keep_ratio 0.2 = HiRED-20% of the image's content tokens (576 of a 2 x 2-tile
    LLaVA-NeXT image with nothing unpadded, as in the code).

    Options selecting tokprune's variants (its former defaults: regions="rectangles",
    base_budget="content"):
      regions="rectangles": a base token counts for the tile whose area of the image holds its centre, on
          the unpadded mosaic (`Mosaic.base_regions`), so a tile's score measures the content of its own
          part of the image;
      base_budget="content": the base view gets floor(alpha * k), its share of what is actually kept.

    Remaining differences from the authors' code:
      (1) exactly k tokens: the code keeps fewer (its truncated shares; on a 2 x 2-tile image up to T
          tokens fewer than 576) and, with unpadding, what its choices in the padding leave; here the
          leftover goes by largest remainder and what the tiles cannot hold to the base view;
      (2) padded tiles: the code ranks each tile's tokens among all its 576 ViT tokens, padding included,
          and drops its picks in the padding when it unpads; transformers never gives the LLM the padding
          tokens and tokprune does not see them, so each tile's share is filled from its present tokens
          and the tiles' total is k minus the base share (the code's count of kept tile tokens depends on
          how its padding tokens rank, unknown here);
      (3) the budget is the keep ratio of the content tokens (ceil); the code takes int(rate * (1 + T) *
          576) of the padded ones (the base share follows the code's count, step 1);
      (4) attention is the head mean (the code sums the heads: same ranking); ties go to the lower index;
      (5) tiles that unpadding removes entirely have no tokens here, and the bands are cut over the
          remaining tiles (the code counts every tile); base views whose size T does not divide make the
          code fail, here the runs are t * n_base // T .. (t + 1) * n_base // T;
      (6) the code runs transformers 4.42.dev, whose LLaVA-NeXT lays a non-square tile grid (1 x 2, 2 x 1)
          out transposed before unpadding (transformers issue 31327, fixed in PR 32314) and unpads with
          int() where transformers now rounds first: tokprune follows the model it runs on, so on such
          grids the code's LLM input differs in layout; the choices per tile follow the code.
    Needs tiles: `tokprune.apply` refuses models without them (`needs_tiles`).
    """

    name = "hired"
    family = "high-res budget (AnyRes only)"
    where = "pre"
    default_budget = Budget(ratio=0.2)
    paper = "Arif et al., AAAI 2025 (HiRED, arXiv:2408.10945)"
    needs_tiles = True
    code_families = ("llava_next",)

    alpha: float = 0.5
    early_layer: int = 0
    final_layer: int | None = None
    content_ratio: float | None = None
    regions: str = "bands"
    base_budget: str = "padded"

    def __post_init__(self) -> None:
        check_number(self, "alpha", 0, 1)
        check_number(self, "content_ratio", 0, 1, optional=True)
        check_vision_layer(self, "early_layer")
        check_vision_layer(self, "final_layer", optional=True)
        check_choice(self, "regions", _REGIONS)
        check_choice(self, "base_budget", _BASE_BUDGETS)

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
        padded = (1 + len(tiles)) * base.numel() if self.base_budget == "padded" else None
        k_base, k_tiles = base_share(k, self.alpha, base.numel(), sizes, padded)
        ratio = 1.0 - self.alpha if self.content_ratio is None else self.content_ratio
        early = image.signals[self.early_signal].to(device).float().reshape(-1)[base]
        weights = content_scores(mosaic, early, int(ratio * base.numel()), self.regions)
        quotas = allocate_quotas(weights, sizes, k_tiles)
        parts = [base, *tiles]
        kept = [idx[topk_sorted(final[idx], q)] for idx, q in zip(parts, [k_base, *quotas])]
        return Selection(keep=torch.cat(kept).sort().values)
