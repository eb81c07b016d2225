"""HiPrune (Liu et al., arXiv:2508.00553): anchors from an object-centric middle ViT layer, their grid
neighbours as buffers, and registers from the deep layer."""

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
_NEIGHBOURS = ("flat", "grid")
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
    return _others(tokens, found, h * w)


def flat_neighbours(tokens: torch.Tensor, h: int, w: int, neighbourhood: int = 4) -> torch.Tensor:
    """Sorted distinct neighbours of `tokens` by the authors' flat-index rule, minus `tokens`.

    Token t brings t - 1, t + 1, t - w, t + w (neighbourhood 8: also t - w - 1, t - w + 1, t + w - 1,
    t + w + 1), each clamped to [0, h * w - 1]: the last token of a row brings the first of the next row
    (and the first token of a row the last of the previous one), and a first-row (last-row) token brings
    token 0 (token h * w - 1) for its missing upper (lower) neighbour. The authors' LLaVA code does this
    with w = 24 and n = 576 (`encode_images` in LLaVA/llava/model/llava_arch.py).
    """
    tokens = tokens.reshape(-1).long()
    found = [(tokens + dr * w + dc).clamp(0, h * w - 1) for dr, dc in _OFFSETS[neighbourhood]]
    return _others(tokens, found, h * w)


def _others(tokens: torch.Tensor, found: list[torch.Tensor], n: int) -> torch.Tensor:
    """Sorted distinct indices of `found` (tensors of indices in [0, n)) that are not in `tokens`."""
    near = torch.zeros(n, dtype=torch.bool, device=tokens.device)
    if found:
        near[torch.cat(found)] = True
    near[tokens] = False
    return near.nonzero().squeeze(1)


_NEIGHBOUR_RULES = {"flat": flat_neighbours, "grid": grid_neighbours}


def hiprune_parts(
    object_attention: torch.Tensor,
    deep_attention: torch.Tensor,
    grid: tuple[int, int],
    k: int,
    alpha: float = 0.1,
    neighbourhood: int = 4,
    neighbours: str = "flat",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors, buffers, registers): disjoint sorted index tensors whose sizes add up to k (0 <= k <= n).

    1. anchors: the round(alpha * k / (1 + neighbourhood)) tokens with the largest object-layer attention
       (Python round, half to even; never more than k);
    2. buffers: the neighbours of the anchors that are not anchors themselves, by the authors' clamped
       flat-index rule (neighbours="flat", `flat_neighbours`) or in the 2-D grid (neighbours="grid",
       `grid_neighbours`); if anchors plus buffers exceed k (only for large alpha), the buffers with the
       largest object-layer attention fill the k - |anchors| places left;
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
    buffers = _NEIGHBOUR_RULES[neighbours](anchors, h, w, neighbourhood)
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
    """HiPrune — Liu, Du, Zhu, Lian, Li, Chen, "HiPrune: Training-Free Visual Token Pruning via
    Hierarchical Attention in Vision-Language Models", arXiv:2508.00553 v1/v2 (2025); v3 (2026, with
    Guan and Wang) is titled "HiPrune: Hierarchical Attention for Efficient Token Pruning in
    Vision-Language Models" (ACL 2026 Findings; an AAAI-26 student abstract before that).
    https://arxiv.org/abs/2508.00553, https://arxiv.org/html/2508.00553v2; code:
    https://github.com/Danielement321/HiPrune (LLaVA/llava/model/llava_arch.py `encode_images`,
    Qwen2_5_VL/qwen2_5_vl_HiPrune.py).

    What runs here, per image of n tokens with k to keep (`hiprune_parts`):
      * anchors: the round(alpha * k / 5) tokens receiving the most attention at the object layer;
      * buffers: the anchors' neighbours that are not anchors. Default neighbours="flat", the authors'
        rule (`flat_neighbours`): token t brings t - 1, t + 1, t - w, t + w, each clamped to [0, n - 1]
        on the row-major h x w grid, so a row's last token brings the next row's first (and vice versa)
        and first- / last-row anchors bring token 0 / n - 1. neighbours="grid" (`grid_neighbours`) takes
        up / down / left / right in the 2-D grid with nothing wrapping or clamped, so border anchors
        have fewer buffers and the places left go to registers;
      * registers: the k - |anchors| - |buffers| other tokens receiving the most attention at the deep
        layer.
    "Attention received" is the softmax map of that ViT layer averaged over heads and over all queries
    (on CLIP the [CLS] query included and the [CLS] column dropped): signal "received_attention". Ties
    go to the lower index; kept tokens stay in their original order (the code's order too: it sorts
    them). With no grid (None) the tokens are a 1 x n strip (w = n): "grid" gives the left and right
    neighbours, "flat" also tokens 0 and n - 1 (the clamped t -/+ w).

    What the paper specifies, in the text that could be consulted (abstract and introduction of the
    arXiv HTML, the authors' README and project page, third-party summaries): the ViT's layers attend
    in a hierarchy (shallow layers noisy, middle layers on the main objects, deep layers spread evenly
    over tokens carrying global information; for CLIP-L, from the dispersion of the high-attention
    tokens: shallow 1-4, middle 5-9, deep 10 onward); three kinds of tokens are kept, identified in this
    order: anchors (highest attention in an object-centric middle layer), buffers (spatially adjacent
    to the anchors, for continuity and against attention noise) and registers (highest attention at the
    encoder's output layer, for global context); the rest is dropped before the LLM. Its notation: N'
    the token budget (k here), alpha the proportion of anchor and buffer tokens, l the object layer.
    Published settings: alpha = 0.1; l = 9 (counted from 1) for the CLIP-L of LLaVA-1.5 / LLaVA-NeXT
    and l = 16 for Qwen2.5-VL's 32 blocks; budgets 192 / 128 / 64 of 576 on LLaVA-1.5 (64 is the default
    here), 640 / 320 / 160 on LLaVA-NeXT, keep ratios 0.334 / 0.223 / 0.112 on Qwen2.5-VL. Not in the
    text that could be read (so taken from the authors' code): how the attention score is aggregated,
    the anchor count alpha * N' / 5, how "adjacent" is computed, and which layer is "the output layer".
    v3 adds HiPrune++, a prompt-aware variant that also uses text-token similarity; it is not
    implemented here.

    From the authors' code: scores are the head mean, then query mean, of the softmax attention, with
    the [CLS] column removed (a [CLS]-row variant is left commented out); the object layer is the l-th
    layer (encoder.layers[8] on CLIP-L, visual.blocks[15] on Qwen2.5-VL); the deep layer is the one whose
    output feeds the projector (LLaVA's mm_vision_select_layer = -2; Qwen2.5-VL's last block, scores
    averaged over each 2x2 merge group); anchors = round(alpha * N' / 5) with Python's round (half to
    even), i.e. about alpha * N' anchors plus buffers when each anchor brings four new neighbours. With
    alpha = 0.1: 64 -> 1 anchor, 128 -> 3, 192 -> 4. Signal "@object" is the family's object layer as
    the adapters define it: index round(3/8 * depth) - 1, which is layer 9 of CLIP-L's 24, and half the
    depth on Qwen2.5-VL (block 16 of 32); for ViTs other than these two (SigLIP, InternViT, ...) that
    layer is this library's choice, not a value from the paper. `object_layer` takes an int
    vision-layer index (0-based, negative from the end) instead, `deep_layer` an int instead of the
    feature layer.

    Options that select variants: neighbours="flat" (default, the code) | "grid" (tokprune's 2-D
    neighbours, the variant this library used before, which the paper's "spatially adjacent" also fits);
    neighbourhood=4 (default) | 8 (diagonals too: flat offsets -/+ w -/+ 1, clamped, or the 2-D
    diagonals).

    Agreement (tests/agreement/test_hiprune.py): on the tiny LLaVA-1.5 (24 x 24) and LLaVA-NeXT (base
    view + 2 x 2 tiles of 24 x 24) the kept set equals the re-implementation of the authors' selection.
    The code's grid width 24 and count 576 (LLaVA) are the image's or tile's own grid here, as its
    Qwen2.5-VL code does with the merged grid width.

    Remaining differences from the authors' code, kept on purpose:
      (1) ties are broken towards the lower index (the code's torch.topk leaves their order unspecified);
      (2) when anchors + buffers exceed k (only for large alpha, e.g. alpha = 1 and k = 3; never at the
          default 0.1), the buffers with the most object-layer attention fill the k - |anchors| places,
          so that exactly k tokens are kept; the code would ask for a negative number of registers and
          fail;
      (3) `neighbourhood=8` (diagonals too, round(alpha * k / 9) anchors) is an extension; the code
          uses the 4-neighbourhood (the paper text that could be read only says "adjacent");
      (4) on AnyRes images (LLaVA-NeXT) the code gives every view of the batch, base view and tiles,
          int(N' / number of views) tokens; here the engine splits the image's budget over its units by
          their size (the same split when all units are equal);
      (5) the code's LLaVA-NeXT path fixes mm_patch_merge_type to "spatial": tiles are neither unpadded
          nor given row-end image_newline tokens. tokprune runs on the Hugging Face model, which unpads
          the tile mosaic and adds newlines: the selection is made on the unpadded tiles' tokens and a
          pruned image loses its newlines (the engine's separator rule), so both agree where unpadding
          removes nothing (an image of the pinpoint's aspect ratio), and otherwise the code's padded
          tokens are not candidates here.
    """

    name = "hiprune"
    family = "hierarchical"
    where = "pre"
    default_budget = Budget(tokens=64)
    paper = "Liu et al., arXiv:2508.00553 (HiPrune)"
    spatial = True
    code_families = ("llava", "llava_next", "qwen2_5_vl")

    alpha: float = 0.1
    object_layer: int | str = "object"
    deep_layer: int | None = None
    neighbourhood: int = 4
    neighbours: str = "flat"

    def __post_init__(self) -> None:
        check_number(self, "alpha", 0, 1)
        check_vision_layer(self, "object_layer", named=("object",))
        check_vision_layer(self, "deep_layer", optional=True)
        check_choice(self, "neighbourhood", _NEIGHBOURHOODS)
        check_choice(self, "neighbours", _NEIGHBOURS)

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
        parts = hiprune_parts(obj, deep, (h, w), k, self.alpha, self.neighbourhood, self.neighbours)
        return Selection(keep=torch.cat(parts).sort().values)
