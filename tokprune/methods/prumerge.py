"""PruMerge and PruMerge+: [CLS]-attention outliers kept, each supplemented by its key-nearest neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import (
    ImageTokens,
    Method,
    Selection,
    topk_sorted,
    trivial_selection,
    vision_signal,
)
from tokprune.methods.options import check_choice, check_int, check_number, check_vision_layer

_MERGE_MODES = ("mean", "add")


def iqr_outliers(attention: torch.Tensor, factor: float = 1.5) -> torch.Tensor:
    """Indices of the upper outliers of `attention` by the interquartile-range rule.

    attention: (n,) scores (the [CLS] attention row). Token i is an outlier when
    a_i > Q3 + factor * (Q3 - Q1), with the quartiles linearly interpolated (numpy's default
    percentile). Returns a (m,) LongTensor ordered by attention, highest first (ties: lower index);
    m may be 0. The outliers are always the m highest-attention tokens.
    """
    a = attention.detach().double().reshape(-1)
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype, device=a.device)).tolist()
    fence = q3 + factor * (q3 - q1)
    order = torch.sort(a, descending=True, stable=True).indices
    return order[a[order] > fence]


def prumerge_adaptive_count(attention: torch.Tensor, factor: float = 1.5) -> int:
    """PruMerge's adaptive budget for one image: the number of IQR outliers of its attention (at least 1).

    attention: (n,). The engine keeps budget.kept(n) tokens per image, a count fixed before the method runs
    (see `PruMerge`, "Budget"), so this count is not applied automatically; pass it as `budget=` for a known
    image, or use it to measure the average ratio.
    """
    return max(1, int(iqr_outliers(attention, factor).numel()))


def uniform_samples(candidates: torch.Tensor, m: int) -> torch.Tensor:
    """m of the candidate indices, evenly spaced along raster order (PruMerge+'s spatial samples).

    candidates: (c,) ascending token indices, c >= m >= 0. Returns the candidates at positions
    floor((2i + 1) * c / (2m)), i = 0 .. m-1: the centre of each of m equal runs of the raster order,
    so the samples cover every part of the grid. Result (m,), ascending and distinct.
    """
    c = candidates.numel()
    if not 0 <= m <= c:
        raise ValueError(f"cannot sample {m} of {c} candidates")
    if m == 0:
        return candidates[:0]
    positions = (2 * torch.arange(m, device=candidates.device) + 1) * c // (2 * m)
    return candidates[positions]


def nearest_neighbours(keys: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` most key-similar other tokens of every kept token.

    keys: (n, d) ViT keys; keep: (k,) token indices. Similarity is the cosine of the keys; a token is never
    its own neighbour; ties go to the lower index. Returns (k, min(count, n - 1)) token indices, most
    similar first.
    """
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit[keep] @ unit.T  # (k, n)
    similarity[torch.arange(keep.numel(), device=keep.device), keep] = -torch.inf
    count = min(count, keys.shape[0] - 1)
    return torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :count]


def merge_neighbours(
    embeds: torch.Tensor, attention: torch.Tensor, keep: torch.Tensor, neighbours: torch.Tensor, mode: str
) -> torch.Tensor:
    """Supplement every kept token with its neighbours, weighted by their attention. Returns (k, D) float32.

    embeds: (n, D); attention: (n,), clamped at 0 (a_j below); keep: (k,); neighbours: (k, m) indices,
    never containing the token itself.
      "mean": x'_i = (a_i x_i + sum_j a_j x_j) / (a_i + sum_j a_j), j over i's neighbours (a plain mean
              of the same tokens if every weight is 0);
      "add":  x'_i = x_i + sum_j a_j x_j (the authors' code).
    """
    x = embeds.float()
    a = attention.float().reshape(-1).clamp_min(0.0)
    rows = torch.arange(keep.numel(), device=keep.device)
    weights = torch.zeros(keep.numel(), x.shape[0], device=x.device)  # (k, n), sparse in effect
    weights.scatter_(1, neighbours, a[neighbours])
    if mode == "add":
        return x[keep] + weights @ x
    weights[rows, keep] = a[keep]
    members = torch.zeros_like(weights).scatter_(1, neighbours, 1.0)
    members[rows, keep] = 1.0
    total = weights.sum(1, keepdim=True)
    weights = torch.where(total > 0, weights, members)
    return (weights @ x) / weights.sum(1, keepdim=True)


def _check_options(method: PruMerge) -> None:
    check_int(method, "neighbours", 0)
    check_choice(method, "merge", _MERGE_MODES)
    check_vision_layer(method, "layer", optional=True)


@dataclass
class PruMerge(Method):
    """PruMerge — Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", arXiv:2403.15388 (ICCV 2025).

    What the paper specifies (read from the arXiv v1 text, its Sec. 1 and the Sec. 3 overview, and from a
    detailed public review, velog.io/@euisuk-chung, quoting Secs. 3.1-3.4 and Algorithm 1; the full
    method text itself was not reachable):
      * Sec. 3.1: the [CLS] attention a = softmax(q_cls K^T / sqrt(d_k)) over the visual tokens;
      * Sec. 3.2, Adaptive Important Token Selection (AITS): the kept tokens are the upper outliers of a
        by the interquartile-range rule, a > Q3 + 1.5 (Q3 - Q1) (only the upper fence is used), so
        their number adapts to the image: 5.5 % of LLaVA-1.5's 576 tokens on average in the main
        results, about 32 (the v1 introduction quotes 6.9 %, about 40);
      * Sec. 3.3, Token Supplement (TS) via similar key clustering: token similarity is the product of
        ViT keys, Sim(y_i, y_j) = k_i k_j^T, with the final layer's keys; every kept token is the centre
        of its k nearest neighbours among the other visual tokens and is updated by a weighted average
        of them, weighted by their [CLS] attention (Sec. 1 and Algorithm 1: "weighted averaging");
      * Algorithm 1 takes the key and query matrices of the ViT's penultimate layer (the layer whose
        features LLaVA reads) and returns the m updated tokens (m = the outlier count).
    Not in the text reached: the number of neighbours, whether the centre itself enters the average, and
    the exact normalisation. From the authors' code (github.com/42Shawn/LLaVA-PruMerge): 32 neighbours
    (16 in its training variant), cosine similarity of the keys, and both the [CLS] attention and the keys
    taken from the q/k projections of the last CLIP block, i.e. computed from the penultimate layer's
    output (the features LLaVA uses), which is how the paper's "penultimate layer" (Algorithm 1) and
    "final layer's key" (Sec. 3.3) agree.

    Here:
      * signals at vision layer `layer` (default -1, the last block as in the code; None = the layer
        whose output feeds the projector, LLaVA's -2; on Qwen2.5-VL -1 is that layer anyway): the
        head-mean [CLS] attention row and the head-mean keys;
      * selection under a budget k (below);
      * supplement: every kept token absorbs its `neighbours` = 32 nearest other tokens (kept or not) by
        cosine similarity of the keys, weighted by their [CLS] attention:
        x'_i = (a_i x_i + sum_j a_j x_j) / (a_i + sum_j a_j) (`merge="mean"`, the weighted average of the
        cluster with its centre, this library's reading of the paper; see `merge_neighbours`).

    Budget: the IQR count (AITS) is not applied per image, and no option offers it, because the engine
    cannot run a method with a count of its own: `tokprune.apply` turns budget=None / keep_ratio=None into
    the method's `default_budget` (`Budget.from_args`), a rule whose count depends only on the image's token
    count n (`Budget.kept(n)`); the engine computes k = budget.kept(n) for every image before the method
    runs (`core.selection.select_pre`) and rejects a selection of any other size (`checked_select`); the
    stats and the invariant tests derive every stage's count from the same arithmetic. A count read from
    the [CLS] attention would need the engine to ask the method for its count first (a change to
    `core/selection.py`, `core/budget.py` and the tests' reference plan), which is not done. So under a budget
    k the kept set is the outliers ranked by attention, truncated to k or topped up by the next-highest
    attention tokens; since the outliers are always the highest-attention tokens, that is the top-k by
    attention (as FasterVLM), and the merge is what differs. The default budget is the paper's average
    adaptive count, keep_ratio 0.055 (32 of LLaVA-1.5's 576 tokens, 5.5%).
    `prumerge_adaptive_count(attention)` gives the adaptive count of one image (to pass as `budget=` for
    that image, or to measure the average ratio on a data set).

    Deliberate differences from the paper and the authors' code: (1) the merge averages the LLM input
    embeddings (after the projector), not the CLIP features before it, so that pruning is one step of the
    engine (as VisionZip here); (2) the scores and keys are head means of the per-head attention and keys
    (the code scores the concatenated heads as one head and compares the concatenated keys); (3) cosine
    similarity as in the code, where the paper writes the plain product of the keys; (4) the code does
    not average: it adds the attention-weighted neighbour sum to the token, unnormalised
    (`merge="add"` reproduces that); (5) the code appends one extra token, the attention-weighted sum of
    all pruned tokens (not in Algorithm 1), so it keeps k + 1; here exactly k tokens are kept; (6) ties go to
    the lower index.
    """

    name = "prumerge"
    family = "[CLS] attention + merge"
    where = "pre"
    default_budget = Budget(ratio=0.055)
    paper = "Shang et al., arXiv:2403.15388, ICCV 2025 (LLaVA-PruMerge)"

    neighbours: int = 32
    merge: str = "mean"
    layer: int | None = -1

    def __post_init__(self) -> None:
        _check_options(self)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (vision_signal("cls_attention", self.layer), vision_signal("vit_keys", self.layer))

    def attention(self, image: ImageTokens) -> torch.Tensor:
        """(n,) the [CLS] attention of the tokens at the method's layer, on the embeddings' device."""
        return image.signals[self.signals[0]].reshape(-1).to(image.embeds.device)

    def keep_set(self, image: ImageTokens, k: int) -> torch.Tensor:
        """(k,) sorted indices of the kept tokens: the top k by attention (the outliers come first)."""
        return topk_sorted(self.attention(image), k)

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        keep = self.keep_set(image, k)
        if self.neighbours == 0:
            return Selection(keep=keep)
        keys = image.signals[self.signals[1]].to(image.embeds.device)
        neighbours = nearest_neighbours(keys, keep, self.neighbours)
        merged = merge_neighbours(image.embeds, self.attention(image), keep, neighbours, self.merge)
        return Selection(keep=keep, merged=merged.to(image.embeds.dtype))


@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+ — the same paper's variant that adds spatially uniform samples to the outliers.

    The paper (Sec. 3.4 and Algorithm 1, as quoted by the review above): the IQR outliers alone can leave
    parts of the image unrepresented, so PruMerge+ adds tokens sampled uniformly over the image, with
    their count tied to the outlier ratio r = m / n; the union is then supplemented by the key-nearest
    neighbours exactly as in PruMerge. About 25 % of LLaVA-1.5's tokens are kept (144 of 576).

    Kept set under a budget k: the IQR outliers of the [CLS] attention (`iqr_factor` = 1.5), highest
    attention first, truncated to k; the remaining k - m slots go to tokens sampled evenly along the
    raster order of the other tokens (`uniform_samples`: the centre of each of k - m equal runs), so they
    spread over the whole grid. Every kept token is then supplemented as in `PruMerge`. Default:
    keep_ratio 0.25.

    Differences from the authors' code, besides those of `PruMerge`: the code samples every
    int(int(1 / r) / 3)-th patch index from 0 (about 3m samples, those already outliers skipped), a count
    not tied to any budget; here the k - m samples fill the budget exactly, evenly spaced over the
    non-outlier tokens and centred in their runs.

    A separate registry name rather than a `plus=True` option, because the published default budget
    differs (0.25 vs 0.055) and a method's default budget belongs to its class; the variant also joins the
    invariant matrix and the catalogue on its own.
    """

    name = "prumerge_plus"
    family = "[CLS] attention + merge"
    default_budget = Budget(ratio=0.25)
    paper = "Shang et al., arXiv:2403.15388, ICCV 2025 (LLaVA-PruMerge+)"

    iqr_factor: float = 1.5

    def __post_init__(self) -> None:
        _check_options(self)
        check_number(self, "iqr_factor", 0)

    def keep_set(self, image: ImageTokens, k: int) -> torch.Tensor:
        """(k,) sorted indices: up to k IQR outliers (by attention), then evenly spread samples of the rest."""
        device = image.embeds.device
        outliers = iqr_outliers(self.attention(image), self.iqr_factor)[:k].to(device)
        rest = torch.ones(image.n, dtype=torch.bool, device=device)
        rest[outliers] = False
        samples = uniform_samples(rest.nonzero().squeeze(1), k - outliers.numel())
        return torch.cat([outliers, samples]).sort().values
