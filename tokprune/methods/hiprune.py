"""HiPrune: anchors from an object-centric middle ViT layer, their grid neighbours, and deep-layer registers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import (
    ImageTokens,
    Method,
    Selection,
    grid_of,
    topk_sorted,
    trivial_selection,
    vision_signal,
)
from tokprune.methods.options import check_choice, check_number, check_vision_layer

_NEIGHBOURHOODS = (4, 8)
_OFFSETS = {
    4: ((-1, 0), (1, 0), (0, -1), (0, 1)),
    8: ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)),
}


def grid_neighbours(tokens: torch.Tensor, h: int, w: int, neighbourhood: int = 4) -> torch.Tensor:
    """Sorted distinct grid neighbours of `tokens` (indices into a row-major h x w grid), minus `tokens`.

    neighbourhood 4: up, down, left, right; 8: also the diagonals. Cells outside the grid are dropped
    (no wrap-around from the end of one row to the start of the next).
    """
    tokens = tokens.reshape(-1).long()
    rows, cols = tokens // w, tokens % w
    found = []
    for dr, dc in _OFFSETS[neighbourhood]:
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        found.append((r * w + c)[inside])
    near = torch.zeros(h * w, dtype=torch.bool, device=tokens.device)
    if found:
        near[torch.cat(found)] = True
    near[tokens] = False
    return near.nonzero().squeeze(1)


def hiprune_parts(
    object_attention: torch.Tensor,
    deep_attention: torch.Tensor,
    grid: tuple[int, int],
    k: int,
    alpha: float = 0.1,
    neighbourhood: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors, buffers, registers): disjoint sorted index tensors whose sizes add up to k (0 <= k <= n).

    1. anchors: the round(alpha * k / (1 + neighbourhood)) tokens with the largest object-layer attention
       (Python round, half to even; never more than k);
    2. buffers: the in-grid neighbours of the anchors that are not anchors themselves; if anchors plus
       buffers exceed k (only for large alpha), the buffers with the largest object-layer attention fill
       the k - |anchors| places left;
    3. registers: the k - |anchors| - |buffers| tokens with the largest deep-layer attention among the
       tokens not chosen yet.
    Ties go to the lower index.
    """
    h, w = grid
    n = h * w
    obj = object_attention.float().reshape(-1)
    deep = deep_attention.float().reshape(-1)
    k = max(0, min(k, n))
    n_anchors = min(k, round(alpha * k / (1 + neighbourhood)))
    anchors = topk_sorted(obj, n_anchors)
    buffers = grid_neighbours(anchors, h, w, neighbourhood)
    room = k - anchors.numel()
    if buffers.numel() > room:
        buffers = buffers[topk_sorted(obj[buffers], room)]
    free = torch.ones(n, dtype=torch.bool, device=obj.device)
    free[anchors] = False
    free[buffers] = False
    free = free.nonzero().squeeze(1)
    registers = free[topk_sorted(deep[free], room - buffers.numel())]
    return anchors, buffers, registers


@dataclass
class HiPrune(Method):
    """HiPrune — Liu et al., "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in
    Vision-Language Models", arXiv:2508.00553 (2025; ACL 2026 Findings).

    Three kinds of tokens are kept out of an image's n, k in all (`hiprune_parts`):
      * anchors: the round(alpha * k / 5) tokens that receive the most attention at an object-centric
        middle ViT layer (attention received = head-mean, query-mean column of the softmax map);
      * buffers: the anchors' 4-neighbours (up, down, left, right) in the token grid, so that
        anchors + buffers take about alpha * k of the budget (alpha is "the proportion of anchor and
        buffer tokens");
      * registers: the remaining tokens, the ones receiving the most attention at the deep layer (the
        layer whose output feeds the projector) that are not anchors or buffers.
    Kept tokens stay in their original order. With no grid (None) the tokens are a 1 x n strip, so
    buffers are the left and right neighbours.

    Defaults, from the authors' public code and README (github.com/Danielement321/HiPrune): alpha = 0.1;
    the object layer is the model family's object-centric middle layer (signal "@object"; the authors
    use layer 9 of CLIP-L's 24 and block 16 of Qwen2.5-VL's 32, counted from 1, i.e. encoder.layers[8]
    and visual.blocks[15]); the deep layer is LLaVA's feature layer (-2) and Qwen's last block; 64 kept
    tokens per image (the 88.9% reduction setting; the paper also reports 192 and 128, and keep ratios
    0.334 / 0.223 / 0.112 on Qwen2.5-VL). `object_layer` takes an int vision-layer index (0-based,
    negative from the end) instead of "object"; `deep_layer` an int instead of the feature layer.

    Budget mapping: with alpha = 0.1, 64 -> 1 anchor, 128 -> 3, 192 -> 4 (each with up to 4 buffers).

    Deliberate differences from the authors' code: (1) neighbours are taken in the 2-D grid; the code
    adds +-1 and +-w to flat indices and clamps them to [0, n-1], so a token at the end of a row gets the
    start of the next row as a "neighbour"; (2) when anchors + buffers exceed k (possible only for
    alpha near 1), the buffers are trimmed by object-layer attention so that exactly k tokens are kept;
    the code would fail (negative register count); (3) `neighbourhood=8` (diagonals too, then
    round(alpha * k / 9) anchors) is an extension; the paper uses 4.
    """

    name = "hiprune"
    where = "pre"
    default_budget = Budget(tokens=64)
    paper = "Liu et al., arXiv:2508.00553 (HiPrune)"
    spatial = True

    alpha: float = 0.1
    object_layer: int | str = "object"
    deep_layer: int | None = None
    neighbourhood: int = 4

    def __post_init__(self) -> None:
        check_number(self, "alpha", 0, 1)
        check_vision_layer(self, "object_layer", named=("object",))
        check_vision_layer(self, "deep_layer", optional=True)
        check_choice(self, "neighbourhood", _NEIGHBOURHOODS)

    @property
    def object_signal(self) -> str:
        return f"received_attention@{self.object_layer}"

    @property
    def deep_signal(self) -> str:
        return vision_signal("received_attention", self.deep_layer)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys((self.object_signal, self.deep_signal)))

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        device = image.embeds.device
        h, w = grid_of(image, self.name)
        obj = image.signals[self.object_signal].to(device)
        deep = image.signals[self.deep_signal].to(device)
        parts = hiprune_parts(obj, deep, (h, w), k, self.alpha, self.neighbourhood)
        return Selection(keep=torch.cat(parts).sort().values)
