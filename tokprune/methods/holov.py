"""HoloV: holistic visual token pruning — the budget is shared across spatial crops of the image."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, grid_of, topk_sorted, trivial_selection
from tokprune.methods.options import check_choice, check_int, check_number

_LAYOUTS = ("blocks", "bands")
_RANK_BY = ("score", "attention")


def crop_layout(h: int, w: int, crop_rows: int, crop_cols: int) -> tuple[int, int]:
    """Rows x columns of the crop partition of an h x w grid: (crop_rows, crop_cols) where both fit.

    When one side of the grid is shorter than the crop count on that side, that side gets one crop per
    row (column) and the other side gets more crops, so the total stays near crop_rows * crop_cols
    (a 1 x n strip with 4 x 4 crops becomes 1 x 16). Never more crops on a side than tokens on it.
    """
    total = crop_rows * crop_cols
    r, c = min(crop_rows, h), min(crop_cols, w)
    if r < crop_rows:
        c = min(w, max(1, total // r))
    elif c < crop_cols:
        r = min(h, max(1, total // c))
    return r, c


def crop_partition(
    h: int, w: int, crop_rows: int = 4, crop_cols: int = 4, layout: str = "blocks"
) -> list[torch.Tensor]:
    """Split the row-major h x w token grid into crops; returns each crop's token indices (ascending).

    "blocks": an r x c partition of the grid into rectangles (see `crop_layout`); row band i covers
    rows [i*h//r, (i+1)*h//r) and column band j columns [j*w//c, (j+1)*w//c), so uneven grids get
    near-equal bands (7 rows into 4 bands: 1, 2, 2, 2). Crops are listed in raster order.
    "bands": crop_rows * crop_cols contiguous slices [i*n//m, (i+1)*n//m) of the raster order (the
    authors' code; a slice may span parts of two image rows). Every token is in exactly one crop and no
    crop is empty.
    """
    n = h * w
    if layout == "bands":
        m = min(crop_rows * crop_cols, n)
        return [torch.arange(i * n // m, (i + 1) * n // m) for i in range(m)]
    r, c = crop_layout(h, w, crop_rows, crop_cols)
    grid = torch.arange(n).view(h, w)
    crops = []
    for i in range(r):
        rows = slice(i * h // r, (i + 1) * h // r)
        for j in range(c):
            crops.append(grid[rows, j * w // c : (j + 1) * w // c].reshape(-1))
    return crops


def holistic_scores(
    embeds: torch.Tensor,
    attention: torch.Tensor,
    crops: list[torch.Tensor],
    alpha: float = 1.0,
    beta: float = 0.09,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores (n,) and crop scores (len(crops),), float32.

    In a crop of m >= 2 tokens with attention a_i and features f_i:
        S_ij = <f_i, f_j> / ((|f_i| + eps)(|f_j| + eps)),  j != i
        mu_i = mean_{j != i} S_ij,   v_i = mean_{j != i} (S_ij - mu_i)^2
        lambda = mean_crop |a| / (mean_crop |v| + eps)
        s_i = alpha * a_i + beta * lambda * v_i
    A one-token crop scores s_i = alpha * a_i. The crop score is the mean of s over the crop.
    """
    x = embeds.float()
    x = x / (x.norm(dim=-1, keepdim=True) + eps)
    a = attention.float().reshape(-1)
    scores = torch.empty_like(a)
    crop_scores = torch.empty(len(crops), dtype=torch.float32, device=a.device)
    for c, idx in enumerate(crops):
        idx = idx.to(a.device)
        a_c = a[idx]
        m = idx.numel()
        if m < 2:
            s_c = alpha * a_c
        else:
            sim = x[idx] @ x[idx].T  # (m, m)
            off = ~torch.eye(m, dtype=torch.bool, device=a.device)
            mean = sim.masked_fill(~off, 0.0).sum(1) / (m - 1)
            var = ((sim - mean[:, None]) ** 2).masked_fill(~off, 0.0).sum(1) / (m - 1)
            scale = a_c.abs().mean() / (var.abs().mean() + eps)
            s_c = alpha * a_c + beta * scale * var
        scores[idx] = s_c
        crop_scores[c] = s_c.mean()
    return scores, crop_scores


def allocate_quotas(weights: list[float], sizes: list[int], k: int) -> list[int]:
    """Integer quotas q_c with sum(q) == min(k, sum(sizes)), 0 <= q_c <= sizes[c], proportional to weights.

    1. Real quotas q*_c = min(sizes[c], t * w_c) with t such that sum(q*) = k ("water filling": a crop
       whose proportional share reaches its size keeps all its tokens and the overflow is re-shared
       among the other crops in proportion to their weights). Non-positive or non-finite weights count
       as 0; if the crops still to be filled all weigh 0, they share by size (uniform per token).
    2. Rounding (largest remainder): unsaturated crops get floor(q*_c); the L = k - sum leftover tokens
       go one each to the L unsaturated crops with the largest fractional parts (ties: larger weight,
       then lower crop index). floor(q*_c) < sizes[c] for those crops, so no quota exceeds its crop.
    """
    n_crops = len(sizes)
    k = min(k, sum(sizes))
    w = [x if math.isfinite(x) and x > 0 else 0.0 for x in weights]
    quota = [0] * n_crops
    ideal = [0.0] * n_crops
    active = [c for c in range(n_crops) if sizes[c] > 0]
    left = k
    while active:
        total = sum(w[c] for c in active)
        share = {c: w[c] for c in active} if total > 0 else {c: float(sizes[c]) for c in active}
        total = sum(share.values())
        full = [c for c in active if left * share[c] / total >= sizes[c]]
        if not full:
            for c in active:
                ideal[c] = left * share[c] / total
            break
        for c in full:
            quota[c] = sizes[c]
            left -= sizes[c]
        active = [c for c in active if c not in full]
    for c in active:
        quota[c] = min(int(math.floor(ideal[c])), sizes[c] - 1)
    leftover = k - sum(quota)
    order = sorted(active, key=lambda c: (-(ideal[c] - math.floor(ideal[c])), -w[c], c))
    while leftover > 0:  # one pass suffices; the loop only guards against float round-off
        progressed = False
        for c in order:
            if leftover == 0:
                break
            if quota[c] < sizes[c]:
                quota[c] += 1
                leftover -= 1
                progressed = True
        if not progressed:
            break
    return quota


@dataclass
class HoloV(Method):
    """HoloV — Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic
    Context Retention", NeurIPS 2025 (arXiv:2510.02912).

    The image's tokens are split into crops (default 4 x 4 = 16 spatial blocks of the token grid, see
    `crop_partition`). In each crop every token gets the holistic score
        s_i = alpha * a_i + beta * lambda_c * v_i,   lambda_c = mean_c|a| / (mean_c|v| + eps),
    where a is the [CLS] attention (head mean, penultimate ViT layer; attention received on CLS-free
    ViTs) and v_i the variance of token i's cosine similarities to the other tokens of its crop (a
    semantically distinctive token has spread-out similarities). The crop score is the mean of s over
    the crop; the budget k is shared across crops in proportion to crop score ** power (capped at each
    crop's size, overflow re-shared, largest-remainder rounding: `allocate_quotas`), and each crop keeps
    its top tokens by s. Kept tokens stay in their original order.

    Defaults, from the authors' public code (github.com/obananas/HoloV, LLaVA-1.5 path): 16 crops,
    alpha = 1, beta = 0.09, power = 1, eps = 1e-6, and 64 kept tokens per image (the 88.9% reduction
    headline; the paper also reports 192 and 128). Note that with non-negative attention and any
    within-crop variation, lambda_c makes the crop score (alpha + beta) * mean_c(a): the variance term
    decides which tokens a crop keeps, while the crop's mean attention decides how many.

    Deliberate differences from the authors' code: (1) crops are 2-D blocks of the token grid (the
    abstract's "spatial crops"); the code slices the raster order into 16 contiguous runs
    (`layout="bands"` reproduces that); (2) tokens inside a crop are ranked by the holistic score s
    (DESIGN §7); the code ranks them by attention alone (`rank_by="attention"` reproduces that);
    (3) the code's rounding gives the leftover tokens to the largest weights and, when a crop's quota
    exceeds its size, keeps fewer tokens and pads with zero embeddings; here the overflow is re-shared
    and exactly k real tokens are kept; (4) the variance runs over j != i only (the code also counts
    the zeroed diagonal entry, adding mu_i^2 / (m - 1), which favours redundant tokens); (5) the code
    multiplies attention by 1e3 before scoring, a common factor that only changes the effect of eps.
    """

    name = "holov"
    where = "pre"
    signals = ("cls_attention",)
    default_budget = Budget(tokens=64)
    paper = "Zou et al., NeurIPS 2025 (HoloV)"
    spatial = True

    crop_rows: int = 4
    crop_cols: int = 4
    alpha: float = 1.0
    beta: float = 0.09
    power: float = 1.0
    eps: float = 1e-6
    layout: str = "blocks"
    rank_by: str = "score"

    def __post_init__(self) -> None:
        check_int(self, "crop_rows", 1)
        check_int(self, "crop_cols", 1)
        check_number(self, "alpha", 0)
        check_number(self, "beta", 0)
        check_number(self, "power", 0, low_open=True)
        check_number(self, "eps", 0, low_open=True)
        check_choice(self, "layout", _LAYOUTS)
        check_choice(self, "rank_by", _RANK_BY)

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        device = image.embeds.device
        h, w = grid_of(image, self.name)
        crops = crop_partition(h, w, self.crop_rows, self.crop_cols, self.layout)
        attention = image.signals["cls_attention"].to(device)
        scores, crop_scores = holistic_scores(image.embeds, attention, crops, self.alpha, self.beta, self.eps)
        weights = [max(s, 0.0) ** self.power for s in crop_scores.tolist()]
        quotas = allocate_quotas(weights, [c.numel() for c in crops], k)
        rank = scores if self.rank_by == "score" else attention.float().reshape(-1)
        kept = [
            idx.to(device)[topk_sorted(rank[idx.to(device)], q)] for idx, q in zip(crops, quotas) if q > 0
        ]
        return Selection(keep=torch.cat(kept).sort().values)
