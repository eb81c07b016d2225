"""MustDrop: local spatial merging with [CLS]-protected key tokens before the LLM, dual-attention filtering
inside it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import (
    CompositeMethod,
    ImageTokens,
    LLMMethod,
    Method,
    ScaledBudget,
    Selection,
    grid_of,
    topk_sorted,
)
from tokprune.methods.options import check_int, check_llm_layer, check_number

TEXT_SIGNAL = "text_query_attention"


def key_tokens(cls_attention: torch.Tensor, k: int, full_n: int, key_ratio: float) -> torch.Tensor:
    """The key token set: the top min(k, ceil(key_ratio * full_n)) tokens by [CLS] attention, sorted."""
    return topk_sorted(cls_attention, min(k, math.ceil(key_ratio * full_n - 1e-9)))


def windows(grid: tuple[int, int], size: int) -> list[torch.Tensor]:
    """Non-overlapping size x size windows of an (h, w) row-major grid, in raster order of windows, each
    the (m,) ascending token indices of its cells (windows at the bottom / right edge may be smaller)."""
    h, w = grid
    index = torch.arange(h * w).view(h, w)
    return [
        index[r : r + size, c : c + size].reshape(-1) for r in range(0, h, size) for c in range(0, w, size)
    ]


def similarity_to_others(x: torch.Tensor) -> torch.Tensor:
    """(m,) mean cosine similarity of each of m >= 2 tokens x (m, D) to the other m - 1."""
    unit = F.normalize(x.float(), dim=-1)
    sims = unit @ unit.T
    return (sims.sum(1) - sims.diagonal()) / (x.shape[0] - 1)


def local_merge_groups(
    embeds: torch.Tensor,
    grid: tuple[int, int],
    protected: torch.Tensor,
    reduce: int,
    size: int = 3,
    threshold: float = 0.8,
) -> list[torch.Tensor]:
    """Local spatial merging: groups of tokens (each (m,) ascending indices) to merge into one token each.

    embeds: (n, D); protected: (n,) bool key tokens, never merged. A window's members are its unprotected
    tokens; its similarity = the mean pairwise cosine similarity of their embeddings. Windows of at least
    2 members and similarity >= `threshold` are merged whole, most similar first (ties: the earlier window),
    while that removes at most `reduce` tokens in all; the window that would remove too many merges only
    its r + 1 members most similar to the others (ties: the lower index), r = the tokens still to remove.
    """
    candidates = []
    for cells in windows(grid, size):
        members = cells[~protected[cells]]
        if members.numel() >= 2:
            similarity = float(similarity_to_others(embeds[members]).mean())
            if similarity >= threshold:
                candidates.append((similarity, members))
    candidates.sort(key=lambda c: -c[0])  # stable: equal windows stay in raster order
    groups, left = [], reduce
    for _, members in candidates:
        if left == 0:
            break
        if members.numel() - 1 > left:
            members = members[topk_sorted(similarity_to_others(embeds[members]), left + 1)]
        groups.append(members)
        left -= members.numel() - 1
    return groups


@dataclass
class MustDropVision(Method):
    """MustDrop's vision stage on one image grid: key tokens, local spatial merging, then (only if merging
    similar windows leaves more than k tokens) the lowest-[CLS]-attention non-key tokens are dropped."""

    name = "mustdrop"
    signals = ("cls_attention",)
    spatial = True
    key_ratio: float = 0.08
    window: int = 3
    threshold: float = 0.8

    def select(self, image: ImageTokens, k: int) -> Selection:
        grid = grid_of(image, self.name)
        n, device = image.n, image.embeds.device
        cls = image.signals["cls_attention"].float().to(device)
        keys = key_tokens(cls, k, n, self.key_ratio)
        protected = torch.zeros(n, dtype=torch.bool, device=device)
        protected[keys] = True
        groups = local_merge_groups(image.embeds, grid, protected.cpu(), n - k, self.window, self.threshold)
        owner = torch.arange(n, device=device)  # the token each token ends up in: a group's last member
        for members in groups:
            owner[members.to(device)] = int(members[-1])
        values = image.embeds.float()
        sizes = torch.zeros(n, device=device).index_add_(0, owner, torch.ones(n, device=device))
        merged = torch.zeros_like(values).index_add_(0, owner, values) / sizes.clamp(min=1)[:, None]
        score = torch.zeros(n, device=device).index_add_(0, owner, cls) / sizes.clamp(min=1)
        alive = (sizes > 0).nonzero().squeeze(1)
        others = alive[~protected[alive]]
        chosen = others[topk_sorted(score[others], k - keys.numel())]
        keep = torch.cat([keys, chosen]).sort().values
        return Selection(keep=keep, merged=merged[keep].to(image.embeds.dtype))


def dual_attention_order(attention: torch.Tensor) -> torch.Tensor:
    """Visual tokens from most to least important by dual attention: (n,) indices.

    attention: (n, m) head-mean attention the m instruction tokens pay the n visual tokens. Global
    attention = the sum over the instruction tokens, individual attention = the maximum; a token ranks by
    the better of its two ranks (either attention alone makes it important, as the paper drops only tokens
    low in both), ties by its global rank.
    """
    n = attention.shape[0]
    ranks = []
    for score in (attention.float().sum(1), attention.float().amax(1)):
        order = torch.sort(score, descending=True, stable=True).indices
        rank = torch.empty(n, dtype=torch.long, device=attention.device)
        rank[order] = torch.arange(n, device=attention.device)
        ranks.append(rank)
    best = torch.minimum(*ranks)
    return torch.sort(best * n + ranks[0]).indices


@dataclass
class MustDropPrefill(LLMMethod):
    """MustDrop's prefill stage: the key tokens (top [CLS] attention of the whole image) always stay; the
    rest of the budget goes to the other tokens in dual-attention order at layer `layer` - 1."""

    name = "mustdrop"
    signals = (TEXT_SIGNAL, "cls_attention")
    counts_on_image = True
    layer: int = 3
    key_ratio: float = 0.08

    def boundaries(self, num_layers: int) -> list[int]:
        check_llm_layer(self.layer, num_layers, "layer", self.name)
        return [self.layer]

    def select(self, image: ImageTokens, k: int) -> Selection:
        full_n = image.full_n if image.full_n is not None else image.n
        keys = key_tokens(image.signals["cls_attention"].float(), k, full_n, self.key_ratio)
        attention = image.signals[TEXT_SIGNAL]  # (n, T), columns >= m are padding
        text = image.text.get(TEXT_SIGNAL)
        m = text.shape[0] if text is not None else attention.shape[1]
        order = dual_attention_order(attention[:, : max(m, 1)])
        is_key = torch.zeros(image.n, dtype=torch.bool, device=order.device)
        is_key[keys.to(order.device)] = True
        rest = order[~is_key[order]][: k - keys.numel()]
        return Selection(keep=torch.cat([keys.to(order.device), rest]).sort().values)


@dataclass
class MustDrop(CompositeMethod):
    """MustDrop — Liu et al., "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal Large
    Language Model", arXiv:2411.10803 (2024).

    Three stages in the paper; two here:
      * vision stage (before the LLM): the key set = the top ceil(`key_ratio` * n) tokens by [CLS]
        attention at the ViT feature layer (0.08, the paper's keep rate; on towers without [CLS] the
        adapter's attention received). Local spatial merging: the token grid is cut into non-overlapping
        `window` x `window` windows (3 x 3); a window's unprotected tokens whose mean pairwise cosine
        similarity is >= `threshold` (0.8) are merged into one token (their mean, at the position of the
        last of them in raster order), most similar windows first; key tokens are never merged. The stage
        keeps exactly ceil(`vision_factor` * f) tokens (default 2f, f the final count): merging stops there
        (a last window merges only as many of its most typical tokens as needed), and if merging similar
        windows does not get there, the lowest-[CLS]-attention non-key tokens (merged ones scored by their
        members' mean) are dropped. AnyRes tiles and video frames are merged unit by unit.
      * prefill stage (inside the LLM, layers >= `layer`, default 3, scored in layer 2 as the paper's
        first filtering layer): the instruction tokens' head-mean attention rows over the visual tokens
        (recomputed from the layer's q/k projections) give every token a global attention (the sum over
        the instruction tokens) and an individual attention (the maximum); the key tokens always stay
        (the top ceil(key_ratio * n) of the whole image by [CLS] attention), the rest of the budget goes
        to the others in `dual_attention_order`.
      * decode stage (output-aware KV-cache policy): not implemented. It evicts cached visual tokens
        during decoding depending on the generated tokens; tokprune never prunes during decode (every
        decode step attends to the prefill's kept set, which `stats` reports and the masked-reference
        invariants check), so the policy does not fit the engine.

    Budget: `budget`/`keep_ratio` = the final count f after the prefill stage; default keep_ratio 192/576
    (the paper's "192" setting read as the final count).

    Deliberate differences: (1) exact counts instead of thresholds that decide how many tokens each stage
    keeps (the similarity threshold only decides which windows may merge; the public code's filter keeps
    tokens above attention thresholds set by its scale/bias options); (2) merging is applied to the LLM
    input embeddings before the LLM, with their cosine similarity, instead of to ViT states after its
    first layer inside the ViT; (3) one filtering stage (the public code repeats the filter after layers
    2, 6, 10, 14, which only matters with adaptive counts); (4) [CLS] attention at the feature layer feeding
    the projector, not the last ViT layer; (5) no decode stage (above).
    """

    name = "mustdrop"
    signals = ("cls_attention", TEXT_SIGNAL)
    default_budget = Budget(ratio=192 / 576)
    paper = "Liu et al., arXiv:2411.10803 (MustDrop)"
    layer: int = 3
    key_ratio: float = 0.08
    window: int = 3
    threshold: float = 0.8
    vision_factor: float = 2.0

    def __post_init__(self) -> None:
        check_int(self, "layer", 1)
        check_int(self, "window", 2)
        check_number(self, "key_ratio", 0, 1)
        check_number(self, "threshold", -1, 1)
        check_number(self, "vision_factor", 1)

    def parts(self) -> list[Method]:
        return [
            MustDropVision(self.key_ratio, self.window, self.threshold),
            MustDropPrefill(self.layer, self.key_ratio),
        ]

    def part_budgets(self, budget: Budget) -> list[Budget]:
        return [ScaledBudget(final=budget, factor=self.vision_factor), budget]
