"""PruMerge and PruMerge+: [CLS]-attention outliers kept, each supplemented by its key-nearest neighbours."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import AdaptiveBudget
from tokprune.methods.base import (
    ImageTokens,
    Method,
    Selection,
    free_slots,
    trivial_selection,
    vision_signal,
)
from tokprune.methods.options import check_bool, check_choice, check_int, check_number, check_vision_layer

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


_SCORES = ("concat", "heads")
_SPACES = ("vision", "llm")


def _check_options(method: PruMerge) -> None:
    check_int(method, "neighbours", 0)
    check_choice(method, "merge", _MERGE_MODES)
    check_choice(method, "score", _SCORES)
    check_choice(method, "merge_space", _SPACES)
    check_bool(method, "summary_token")
    check_vision_layer(method, "layer", optional=True)
    check_number(method, "iqr_factor", 0)


def code_count(attention: torch.Tensor, factor: float = 1.5) -> int:
    """The number of patches the authors' code keeps: int(N * ratio) with ratio = outliers / N (the code's
    `outlier_dectection`, then `int(N * reduction_ratio)`: float arithmetic, so it can be one below the
    outlier count)."""
    n = attention.numel()
    return int(n * (iqr_outliers(attention, factor).numel() / n))


@dataclass
class PruMerge(Method):
    """PruMerge — Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", arXiv:2403.15388 (ICCV 2025). Default: the authors' released code,
    github.com/42Shawn/LLaVA-PruMerge at commit 097c041 (`llava/model/multimodal_encoder/clip_encoder.py:
    CLIPVisionTower.token_prune_merge_advanced`, `outlier_dectection`), on LLaVA-1.5's features before the
    projector.

    The code, per image of N patches (x = the features LLaVA feeds the projector, hidden_states[-2]):
      * score: the [CLS] row of the *last* ViT layer's attention computed as one head over the
        concatenated heads, a = softmax(q_cls · Kᵀ · C^-1/2) (`score="concat"`, signal
        "cls_attention_concat@-1"; C the feature width);
      * count (Adaptive Important Token Selection): m = int(N · r), r = the share of patches above the upper
        IQR fence Q3 + 1.5 (Q3 − Q1) of a (numpy's linear percentiles) — the default budget is adaptive
        (`AdaptiveBudget`): every image keeps its own m + 1 tokens; the top m by a are kept;
      * supplement: every kept patch becomes x_i + Σ_j a_j x_j over its `neighbours` = 32 nearest other
        patches (kept or not) by cosine similarity of the last layer's full-width keys
        ("vit_keys_concat@-1") (`merge="add"`);
      * one extra token (`summary_token`): Σ_j a_j x_j over all patches not kept, placed in the image's first
        free slot (`Selection.extra`);
      * emitted: the kept patches by descending a, then the extra token (`Selection.order`).
    `prumerge_adaptive_count(attention)` gives an image's outlier count.

    With an explicit budget k (no such path in the code): the top k − 1 patches by a, supplemented, and the
    extra token (k including it; `summary_token=False`: the top k).

    Options: neighbours (32); merge: "add" (the code) or "mean" (the attention-weighted mean of the cluster
    with its centre, tokprune's earlier reading of the paper's "weighted averaging"); score: "concat" (the
    code) or "heads" (the head-mean of per-head softmax rows and head-mean keys, "cls_attention@layer" /
    "vit_keys@layer", tokprune's earlier reading); layer: the ViT layer of score and keys (-1; None = the
    feature layer); merge_space: "vision" (the code: the features before the projector) or "llm" (the LLM
    input); summary_token: the code's extra token; iqr_factor: the fence (1.5).

    Remaining differences from the code: (1) ties go to the lower index (torch.topk's tie order is
    unspecified); (2) on towers without [CLS] (SigLIP, Qwen) the score is the attention each patch receives
    (the code has no such path); (3) the code runs LLaVA-1.5 only; elsewhere the same rule runs on each
    image's LLM tokens as the family's adapter lays them out.
    """

    name = "prumerge"
    family = "[CLS] attention + merge"
    where = "pre"
    default_budget = AdaptiveBudget(rule="IQR outliers of the [CLS] attention, + 1 summary token")
    paper = "Shang et al., arXiv:2403.15388, ICCV 2025 (LLaVA-PruMerge)"
    code_families = ("llava",)

    neighbours: int = 32
    merge: str = "add"
    score: str = "concat"
    layer: int | None = -1
    merge_space: str = "vision"
    summary_token: bool = True
    iqr_factor: float = 1.5

    def __post_init__(self) -> None:
        _check_options(self)

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        names = (
            ("cls_attention_concat", "vit_keys_concat")
            if self.score == "concat"
            else ("cls_attention", "vit_keys")
        )
        return tuple(vision_signal(name, self.layer) for name in names)

    @property
    def features(self) -> str:  # type: ignore[override]
        return self.merge_space

    def attention(self, image: ImageTokens) -> torch.Tensor:
        """(n,) the [CLS] attention of the tokens at the method's layer, on the embeddings' device."""
        return image.signals[self.signals[0]].reshape(-1).to(image.embeds.device)

    def code_order(self, image: ImageTokens) -> torch.Tensor:
        """The patches the code keeps, in its order (PruMerge: the top m by attention, highest first)."""
        attention = self.attention(image)
        return _by_attention(attention)[: code_count(attention, self.iqr_factor)]

    def adaptive_count(self, image: ImageTokens) -> int:
        return self.code_order(image).numel() + int(self.summary_token)

    def ordered_keep(self, image: ImageTokens, k: int) -> torch.Tensor:
        """(k,) the kept patches in emission order for a count of k patches: the code's own set where k is
        its adaptive count, else the top k by attention."""
        code = self.code_order(image)
        return code if code.numel() == k else _by_attention(self.attention(image))[:k]

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        n_patches = k - int(self.summary_token)
        ordered = self.ordered_keep(image, n_patches)
        keep, by_slot = ordered.sort()
        attention = self.attention(image)
        values = image.embeds.float()
        rows = values[keep]
        if self.neighbours > 0 and keep.numel():
            keys = image.signals[self.signals[1]].to(image.embeds.device)
            neighbours = nearest_neighbours(keys, keep, self.neighbours)
            rows = merge_neighbours(image.embeds, attention, keep, neighbours, self.merge)
        if not self.summary_token:
            merged = rows.to(image.embeds.dtype) if self.neighbours > 0 else None
            return Selection(keep=keep, merged=merged, order=by_slot.argsort())
        dropped = torch.ones(image.n, dtype=torch.bool, device=keep.device)
        dropped[keep] = False
        summary = (attention[dropped, None].float() * values[dropped]).sum(0)
        slot = free_slots(keep, image.n, 1)
        slots, by_slot_all = torch.cat([keep, slot]).sort()
        emitted = torch.cat([ordered, slot])  # the kept patches in the code's order, then the extra token
        order = torch.searchsorted(slots, emitted)  # slots[order] == emitted
        merged = torch.cat([rows, summary[None]])[by_slot_all]
        extra = slots == slot
        return Selection(keep=slots, merged=merged.to(image.embeds.dtype), order=order, extra=extra)


def _by_attention(attention: torch.Tensor) -> torch.Tensor:
    """All indices by descending attention (ties: lower index)."""
    return torch.sort(attention.float(), descending=True, stable=True).indices


@dataclass
class PruMergePlus(PruMerge):
    """PruMerge+ — the same paper's variant that adds spatially sampled patches to the outliers. Default: the
    authors' released code (`token_prune_merge_advanced_plus`, what the repository's `forward` runs).

    The code, besides PruMerge's rule: with r = m / N and step = int(1 / r), every int(step / 3)-th patch
    index from 0 below N − 1 (575 on LLaVA-1.5) that is not kept already is added, in ascending order
    (about 3m samples); the union is supplemented and followed by the extra token exactly as in PruMerge.
    Default budget adaptive (every image its own count). Where the code fails (no outlier: a division by
    zero; r > 1/3: a zero step) this keeps no sample / samples every patch.

    With an explicit budget k (no such path in the code): up to k − 1 IQR outliers (by attention), then
    patches sampled evenly along the raster order of the others (`uniform_samples`: the centre of each of the
    remaining equal runs), then the extra token.

    A separate registry name rather than a `plus=True` option, because the published default differs and a
    method's default budget belongs to its class; the variant also joins the invariant matrix and the
    catalogue on its own.
    """

    name = "prumerge_plus"
    family = "[CLS] attention + merge"
    default_budget = AdaptiveBudget(
        rule="IQR outliers + spatial samples of the [CLS] attention, + 1 summary token"
    )
    paper = "Shang et al., arXiv:2403.15388, ICCV 2025 (LLaVA-PruMerge+)"

    def code_order(self, image: ImageTokens) -> torch.Tensor:
        """The code's kept patches: the top m by attention, then its spatial samples in ascending order."""
        top = super().code_order(image)
        n = image.n
        outliers = iqr_outliers(self.attention(image), self.iqr_factor).numel()
        if outliers == 0:  # r = 0: the code divides by zero; here nothing is sampled
            return top
        step = int(int(1 / (outliers / n)) / 3)  # 0 when r > 1/3, where the code's arange fails: 1 here
        samples = torch.arange(0, n - 1, max(step, 1), device=top.device)
        samples = samples[~torch.isin(samples, top)]
        return torch.cat([top, samples])

    def ordered_keep(self, image: ImageTokens, k: int) -> torch.Tensor:
        code = self.code_order(image)
        if code.numel() == k:
            return code
        device = image.embeds.device
        outliers = iqr_outliers(self.attention(image), self.iqr_factor)[:k].to(device)
        rest = torch.ones(image.n, dtype=torch.bool, device=device)
        rest[outliers] = False
        samples = uniform_samples(rest.nonzero().squeeze(1), k - outliers.numel())
        return torch.cat([outliers, samples])
