"""MustDrop: local spatial merging with [CLS]-chosen key tokens before the LLM, text-guided dual-attention
filtering inside it (the paper's decode-stage cache policy is not a stage here; see `MustDrop`)."""

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
    vision_signal,
)
from tokprune.methods.options import check_int, check_llm_layer, check_number, check_vision_layer

TEXT_SIGNAL = "text_query_attention"
FEATURE = "feature"  # key_layer: the ViT layer feeding the projector (tokprune's earlier reading)


def key_signal(key_layer: int | str) -> str:
    """The [CLS]-attention signal that ranks the key tokens: at ViT layer `key_layer` (the code: -1, CLIP's
    last layer), or at the feature layer for "feature"."""
    return vision_signal("cls_attention", None if key_layer == FEATURE else key_layer)


def key_tokens(cls_attention: torch.Tensor, k: int, full_n: int, key_ratio: float) -> torch.Tensor:
    """The key tokens a stage keeping k tokens protects: (min(k, K),) sorted indices, K = ceil(key_ratio *
    full_n), the top by [CLS] attention over all the tokens given (ties: the lower index).

    One rule for both stages: the image's key set is its top K tokens by [CLS] attention over the whole
    image (every AnyRes tile / video frame together); full_n = the image's content tokens before any
    pruning (the released code takes its 8% of the tokens left after merging; see `MustDrop`, difference
    3). The vision stage protects them all (it keeps at least K when k >= K); the prefill stage ranks the
    tokens the vision stage left, in which the keys are still the top K, so it protects the same set, or
    its top k when its count k is below K.
    """
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


def merge_candidates(
    embeds: torch.Tensor,
    grid: tuple[int, int],
    protected: torch.Tensor,
    size: int = 3,
    threshold: float = 0.8,
) -> list[tuple[float, torch.Tensor]]:
    """The windows of one token grid that may merge: (similarity, members (m,) ascending indices), in raster
    order of windows.

    embeds: (n, D); protected: (n,) bool key tokens, never merged. A window's members are its unprotected
    tokens; its similarity = the mean cosine similarity over the ordered pairs of distinct members (the
    released code's window score, there over all 9 cells). Windows of at least 2 members and similarity >=
    `threshold` are candidates.
    """
    candidates = []
    for cells in windows(grid, size):
        members = cells[~protected[cells]]
        if members.numel() >= 2:
            similarity = float(similarity_to_others(embeds[members]).mean())
            if similarity >= threshold:
                candidates.append((similarity, members))
    return candidates


def take_groups(
    candidates: list[tuple[float, torch.Tensor]], embeds: torch.Tensor, reduce: int
) -> list[torch.Tensor]:
    """The groups to merge (each (m,) ascending indices into embeds (n, D)): candidate windows most similar
    first (ties: the earlier candidate), merged whole while that removes at most `reduce` tokens in all; the
    window that would remove too many merges only its r + 1 members most similar to the others (ties: the
    lower index), r = the tokens still to remove. The cap and the partial window are tokprune's (exact
    counts); the released code merges every window at or above the threshold."""
    ranked = sorted(candidates, key=lambda c: -c[0])  # stable: equal windows stay in their order
    groups, left = [], reduce
    for _, members in ranked:
        if left == 0:
            break
        if members.numel() - 1 > left:
            members = members[topk_sorted(similarity_to_others(embeds[members]), left + 1).cpu()]
        groups.append(members)
        left -= members.numel() - 1
    return groups


def local_merge_groups(
    embeds: torch.Tensor,
    grid: tuple[int, int],
    protected: torch.Tensor,
    reduce: int,
    size: int = 3,
    threshold: float = 0.8,
) -> list[torch.Tensor]:
    """Local spatial merging of one grid: `take_groups` of its `merge_candidates` (see both)."""
    return take_groups(merge_candidates(embeds, grid, protected, size, threshold), embeds, reduce)


def grids_of(image: ImageTokens, method: str) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """The image's token grids as (indices (m,) into its tokens, (h, w)): one per AnyRes tile / base view /
    video frame (`ImageTokens.units`; a unit without a grid is a 1 x m strip), or the whole image's grid."""
    if not image.units:
        return [(torch.arange(image.n), grid_of(image, method))]
    return [(u.index.cpu(), u.grid or (1, u.index.numel())) for u in image.units]


@dataclass
class MustDropVision(Method):
    """MustDrop's vision stage on one image: key tokens (`key_tokens` over the whole image, chosen first,
    never merged), local spatial merging inside each grid (every AnyRes tile / base view / video frame on
    its own, the most similar windows of all grids first), then (only if merging similar windows leaves
    more than k tokens) the lowest-[CLS]-attention non-key tokens of the image are dropped, a merged token
    scored by its members' mean. The final drop is tokprune's, to keep exactly k; the released code's vision
    stage only merges. Not `spatial`: the key set and the drop rank the whole image, so that the prefill
    stage, which sees the image whole, protects the same keys."""

    name = "mustdrop"
    family = "multi-stage"
    code_families = ("llava",)
    key_ratio: float = 0.08
    window: int = 3
    threshold: float = 0.8
    key_layer: int | str = -1

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (key_signal(self.key_layer),)

    def select(self, image: ImageTokens, k: int) -> Selection:
        n, device = image.n, image.embeds.device
        cls = image.signals[key_signal(self.key_layer)].float().reshape(-1).to(device)
        keys = key_tokens(cls, k, image.full_n or n, self.key_ratio)
        protected = torch.zeros(n, dtype=torch.bool)
        protected[keys.cpu()] = True
        candidates = []
        for index, grid in grids_of(image, self.name):
            local = merge_candidates(image.embeds[index], grid, protected[index], self.window, self.threshold)
            candidates += [(similarity, index[members]) for similarity, members in local]
        owner = torch.arange(n, device=device)  # the token each token ends up in: a group's last member
        for members in take_groups(candidates, image.embeds, n - k):
            owner[members.to(device)] = int(members[-1])
        values = image.embeds.float()
        sizes = torch.zeros(n, device=device).index_add_(0, owner, torch.ones(n, device=device))
        merged = torch.zeros_like(values).index_add_(0, owner, values) / sizes.clamp(min=1)[:, None]
        score = torch.zeros(n, device=device).index_add_(0, owner, cls) / sizes.clamp(min=1)
        alive = (sizes > 0).nonzero().squeeze(1)
        others = alive[~protected.to(device)[alive]]
        chosen = others[topk_sorted(score[others], k - keys.numel())]
        keep = torch.cat([keys, chosen]).sort().values
        return Selection(keep=keep, merged=merged[keep].to(image.embeds.dtype))


def dual_attention_order(attention: torch.Tensor) -> torch.Tensor:
    """Visual tokens from most to least important by dual attention: (n,) indices.

    attention: (n, m) head-mean attention the m instruction tokens pay the n visual tokens. Global
    attention = the sum over the instruction tokens, individual attention = the maximum; a token ranks by
    the better of its two ranks, ties by its global rank. So every prefix of the order is the union of the
    top r tokens by each attention (r as large as fits) plus, at its end, tokens of rank r taken by global
    rank. This is the exact-count form of the released code's filter, which drops a token only when both
    attentions are below their thresholds (either one alone keeps it), here with the two thresholds set to
    admit equally many tokens.
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
    """MustDrop's prefill stage: the key tokens (`key_tokens`: the top ceil(key_ratio * full_n) by [CLS]
    attention over the whole image, the set the vision stage protected, or its top k when k is smaller)
    always stay; the rest of the budget goes to the other tokens in `dual_attention_order` of layer
    `layer` - 1's instruction-to-visual attention; layers >= `layer` see only the kept tokens."""

    name = "mustdrop"
    family = "multi-stage"
    counts_on_image = True
    code_families = ("llava",)
    code_positions = "contiguous"
    layer: int = 3
    key_ratio: float = 0.08
    key_layer: int | str = -1

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (TEXT_SIGNAL, key_signal(self.key_layer))

    def boundaries(self, num_layers: int) -> list[int]:
        check_llm_layer(self.layer, num_layers, "layer", self.name)
        return [self.layer]

    def select(self, image: ImageTokens, k: int) -> Selection:
        full_n = image.full_n if image.full_n is not None else image.n
        keys = key_tokens(image.signals[key_signal(self.key_layer)].float(), k, full_n, self.key_ratio)
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

    What the paper says, as far as its text could be read here (the arXiv abstract and the opening of the
    v1 HTML page; the method section, its equations and its settings were not reachable, so no section or
    equation is cited): a token's importance is judged across the whole request, in three stages.
    (a) Vision encoding: spatially adjacent tokens of high similarity are merged (local spatial merging),
    and a key token set of the most vision-critical tokens is formed, which no later stage may discard.
    (b) Prefilling: guided by the text, a dual-attention filter removes further vision tokens. (c) Decoding:
    an output-aware cache policy shrinks the KV cache further. None of the numbers below is in that text.

    What the authors' released code does (github.com/liuting20/MustDrop: clip_encoder.py, local_merge.py,
    modelling_sparse_llama.py, scripts/v1_5/eval/textvqa_*.sh), the source of every number used here:
      * merging runs inside CLIP, on the states after its first layer: the 24 x 24 grid is cut into
        non-overlapping 3 x 3 windows; a window's score is the mean cosine similarity over the ordered
        pairs of its 9 distinct cells; every window scoring >= 0.8 becomes one token, the mean of its
        cells (how many windows merge is left to the threshold); merged tokens are placed ahead of the
        unmerged ones;
      * key set: the top ceil(0.08 x the tokens left after merging) by head-mean [CLS] attention of CLIP's
        last layer (index 23), chosen after merging (a merged token can be a key);
      * prefill: after LLM layers 2, 6, 10 and 14 (0-based), that layer's head-mean attention from every
        text token after the image to the vision tokens gives each vision token a global attention (the
        sum over those text rows) and an individual attention (the maximum); a token is dropped only when
        its global attention is below global_thr x the image's total and its individual attention below
        individual_thr (0.001 / 0.001, 0.0012 / 0.001 and 0.011 / 0.01 in the "192", "128" and "64"
        TextVQA scripts); the key tokens are added back after every filter;
      * decoding: when prefill ends, the KV caches of layers 2 to 14 are cut to the tokens the last filter
        kept (layers 0 and 1 keep every token); nothing is evicted during the decode steps.

    Default: that code as far as the engine lets a stage follow it (commit 909afa5 of the repository):
      * vision stage (`MustDropVision`, before the LLM): the code's merges only windows at or above the
        threshold and drops nothing, a count the data decides; an engine stage keeps a count fixed in
        advance, so by default (`vision_factor=None`) the stage keeps every token and merges nothing, which
        is the code's outcome whenever no window reaches 0.8 (difference 1). With `vision_factor` = x the
        stage keeps exactly ceil(x * f) tokens (f the final count; tokprune's earlier default was 2): the
        key set = the top ceil(`key_ratio` * n) tokens by [CLS] attention over the whole image (n the
        image's tokens, all its AnyRes tiles / video frames together), never merged; local spatial merging
        (`local_merge_groups`): non-overlapping `window` x `window` windows (3 x 3) of the token grid; a
        window's non-key tokens whose mean pairwise cosine similarity is >= `threshold` (0.8) become one
        token (their mean, at the position of the last of them in raster order), most similar windows
        first; merging stops at the count (a last window merges only its most typical tokens), and if
        merging similar windows does not get there, the lowest-[CLS]-attention non-key tokens (a merged one
        scored by its members' mean) are dropped. Windows never cross an AnyRes tile / video frame;
      * key set (both stages, `key_tokens`): the top ceil(`key_ratio` * n) tokens (0.08, the code's; 47 of
        576) by head-mean [CLS] attention at ViT layer `key_layer` (-1, CLIP's last layer, the code's
        index 23; "feature": the layer feeding the projector, tokprune's earlier reading); on towers
        without [CLS] the adapter's attention received; the prefill stage protects exactly the vision
        stage's keys (its top f of them when f is below the key count);
      * prefill stage (`MustDropPrefill`, layers >= `layer`, default 3, i.e. scored in layer 2, the code's
        first filter layer): the head-mean attention rows of every real text token after the image over
        the visual tokens (recomputed from layer 2's q/k projections) give the global (sum) and individual
        (maximum) attention; the key tokens always stay, the rest of the budget goes to the others in
        `dual_attention_order`. That order is the code's filter at exact counts: its kept set (keys, every
        token whose global share reaches global_thr or whose individual attention reaches individual_thr)
        is, when both thresholds admit the same number r of tokens, exactly the keys plus a prefix of the
        order;
      * no decode stage (difference 5).

    Budget: `budget`/`keep_ratio` = the final count f after the prefill stage; default keep_ratio 192/576,
    the "192" setting read as the final count (the code reaches its settings through thresholds, so its
    counts vary per image, and its printed "equal token number" is the mean over the layers).

    Remaining differences from the code:
      (1) the vision stage: the code merges, inside CLIP, the states after its first layer and runs the
          remaining layers on the merged sequence (merged tokens first), so its features, [CLS] attention
          and key set come from the merged sequence; tokprune acts after the ViT and a stage's count is
          fixed in advance, so by default it does not merge (the code's outcome when no window reaches the
          threshold), and with `vision_factor` it merges the LLM input embeddings by their cosine
          similarity and drops to its count; edge windows may be smaller (the code needs the grid
          divisible by 3); a merged token stays at its last cell's position;
      (2) exact counts instead of thresholds: the prefill filter keeps the budget, in `dual_attention_order`
          (the code's thresholds 0.001 / 0.001 etc. decide its count per image);
      (3) one filter stage instead of four (after layers 2, 6, 10, 14): with exact counts, repeating the
          filter at the same final count would keep every token;
      (4) kept tokens keep their original positions (the engine's rule); the code renumbers the shortened
          sequence after every filter (the reproduction mode renumbers only the LLM input);
      (5) no decode stage: tokprune never prunes during decode. After its prefill, layers >= `layer` hold
          only the kept tokens in their KV cache and earlier layers every token the LLM received; the code
          cuts the caches of layers 2 to 14 to the final kept tokens when prefill ends (so with the default
          `layer` 3 the one layer whose decode-time cache differs is layer 2, which the code cuts and
          tokprune keeps whole), and numbers each decode token by its layer's cache length;
      (6) the key count is taken on the image's tokens before merging, over the whole image (the code: 8%
          of the tokens left after merging, one 576-token image); keys are never merged (without re-running
          the ViT a merged token has no [CLS] attention of its own);
      (7) ties in an attention score go to the lower index.
    """

    name = "mustdrop"
    family = "multi-stage"
    default_budget = Budget(ratio=192 / 576)
    paper = "Liu et al., arXiv:2411.10803 (MustDrop)"
    code_families = ("llava",)
    layer: int = 3
    key_ratio: float = 0.08
    window: int = 3
    threshold: float = 0.8
    vision_factor: float | None = None
    key_layer: int | str = -1

    def __post_init__(self) -> None:
        check_int(self, "layer", 1)
        check_int(self, "window", 2)
        check_number(self, "key_ratio", 0, 1)
        check_number(self, "threshold", -1, 1)
        check_number(self, "vision_factor", 1, optional=True)
        check_vision_layer(self, "key_layer", named=(FEATURE,))

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (key_signal(self.key_layer), TEXT_SIGNAL)

    def parts(self) -> list[Method]:
        return [
            MustDropVision(self.key_ratio, self.window, self.threshold, self.key_layer),
            MustDropPrefill(self.layer, self.key_ratio, self.key_layer),
        ]

    def part_budgets(self, budget: Budget) -> list[Budget]:
        vision = (
            Budget(ratio=1.0)
            if self.vision_factor is None
            else ScaledBudget(final=budget, factor=self.vision_factor)
        )
        return [vision, budget]
