"""HoloV (Zou et al., NeurIPS 2025): visual token pruning whose budget is shared across spatial crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, grid_of, topk_sorted, trivial_selection
from tokprune.methods.options import check_choice, check_int, check_number, check_only_with

_LAYOUTS = ("blocks", "bands")
_RANK_BY = ("score", "attention")
ALPHA, BETA = 1.0, 0.09  # the authors' code


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
    "bands": m = crop_rows * crop_cols contiguous runs of the raster order, split as the authors' code
    splits them: every run has n // m tokens and the first n % m runs one more (49 tokens into 16 runs:
    4, 3, ..., 3); a run may span parts of two image rows. With fewer tokens than crops, one crop per
    token. Every token is in exactly one crop and no crop is empty.
    """
    n = h * w
    if layout == "bands":
        m = min(crop_rows * crop_cols, n)
        size, extra = divmod(n, m)
        bounds = [i * size + min(i, extra) for i in range(m + 1)]  # the first `extra` runs get one more
        return [torch.arange(bounds[i], bounds[i + 1]) for i in range(m)]
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
    A one-token crop scores s_i = alpha * a_i. The crop score is the mean of s over the crop, which equals
    (alpha + beta) * mean_crop(a) when attention is non-negative and v is not all zero in the crop.
    This is the authors' code without its 1e3 attention factor (an exact common factor) and with the
    variance taken over j != i only (the code's sum also counts the zeroed diagonal entry).
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
    """HoloV — Zou, Lu, Wang, Yan, Lyu, Zheng, Zhang, Hu, "Don't Just Chase 'Highlighted Tokens' in
    MLLMs: Revisiting Visual Holistic Context Retention", NeurIPS 2025, arXiv:2510.02912
    (https://arxiv.org/abs/2510.02912, https://arxiv.org/html/2510.02912v1; code:
    https://github.com/obananas/HoloV, `utils.HoloV`).

    What runs here, per image of n tokens with k to keep:
      1. crops: the token grid is cut into crop_rows x crop_cols crops, 4 x 4 = 16 by default
         (`crop_partition`);
      2. token score, inside each crop of m >= 2 tokens (`holistic_scores`):
             s_i = alpha * a_i + beta * lambda_c * v_i,   lambda_c = mean_c|a| / (mean_c|v| + eps),
         a = [CLS] attention (head mean, at the feature layer: LLaVA-1.5's penultimate layer; on
         CLS-free ViTs the adapters give the attention each patch receives instead), v_i = variance of
         the cosine similarities of token i to the other tokens of its crop, computed on the tokens'
         current embeddings (after the projector); a one-token crop scores alpha * a_i;
      3. budget: crop c gets a share of k proportional to max(mean_c(s), 0) ** power, capped at its
         size with the excess handed to the other crops, integer by largest remainder
         (`allocate_quotas`), so exactly k tokens are kept;
         images of several units (an AnyRes base view and its tiles, the frames of a video clip): each
         unit's grid is cut into its own crop_rows x crop_cols crops (`image_crops`) and the crops of
         ALL units share the image's k by crop score in this same step, so a tile or frame gets what
         its crops score, not a share by its size. This extends the paper's rule (the budget follows
         crop importance) from one grid to an image made of several; the authors' code handles one
         grid per image only, so there is no published rule for tiles or frames;
      4. each crop keeps its quota of top tokens by s (ties: lower index); kept tokens stay in order.

    Where each part comes from. The paper text that could be consulted (abstract, arXiv HTML front
    matter, third-party summaries, the public NeurIPS review) establishes the idea: attention-first
    pruning keeps clusters of semantically similar tokens; HoloV instead spreads the budget over spatial
    crops of the image, adaptively, with an importance that combines [CLS] attention with the semantic
    diversity of tokens within a crop, so that the kept set covers the whole scene; its headline setting
    is 64 of LLaVA-1.5's 576 tokens (88.9% pruned, 95.8% of the performance kept), which is the default
    budget here. Summaries of the paper also mention an optional refetch of pruned context through the
    FFN, not implemented here. Its method section (equation numbers, the exact crop definition, the
    allocation rule, the values of alpha / beta) could not be read, and the public review of the submission
    (OpenReview zKoeRtye8o) remarks that the crop definition and the hyperparameters are under-specified
    in the paper. The formulas of steps 2 and 3 and the defaults (16 crops, alpha = 1, beta = 0.09,
    power = 1, eps = 1e-6, similarity on projected features, penultimate-layer [CLS] attention) are
    therefore those of the authors' code; their LLaVA-1.5 path hard-codes 16 crops and 64 tokens.

    An identity worth knowing: since lambda_c rescales the variance to the crop's mean attention, the
    crop score is mean_c(s) = (alpha + beta) * mean_c(a) for non-negative attention whenever v is not
    identically zero in the crop (exactly, up to eps; the same holds in the authors' code). So the
    diversity term never changes how many tokens a crop gets, only which ones; in the authors' code,
    which ranks inside crops by attention, it has no effect at all.

    Differences from the authors' code, kept on purpose (options reproduce the code where noted):
      (1) crop shape: 2-D blocks of the grid, the natural reading of "spatial crops"; the code cuts the
          raster order into 16 contiguous runs of n // 16 tokens, the first n % 16 runs one longer
          (`layout="bands"` reproduces that split exactly);
      (2) crop count: fixed here (crop_rows * crop_cols); the code's LLaVA-1.5 path only ships 16 crops
          at 64 tokens, and its Qwen2.5-VL path uses max(1, floor((1024 / 576) * n / k)) crops, which is
          16 at 64 of 576 but 8 at 128 and 5 at 192;
      (3) ranking inside a crop: by s, so that the diversity term the method is named for acts at all
          (see the identity above); the code computes s but keeps each crop's top tokens by attention
          alone (`rank_by="attention"` reproduces that; alpha and beta then only scale the crop scores
          by alpha + beta, a common factor apart from one-token crops, so giving them with it is refused);
      (4) integer budgets: the code floors the shares, gives the leftover tokens one each to the crops
          with the largest weights, and when a share exceeds its crop keeps the whole crop and drops
          the excess, padding the sequence with zero embeddings; here the excess is re-shared, the
          leftover goes by largest fractional part, and exactly k real tokens are kept;
      (5) variance over j != i only; the code's sum also counts the zeroed diagonal entry, adding
          mu_i^2 / (m - 1) to v_i, which favours tokens similar to the rest of their crop;
      (6) the code multiplies attention by 1e3 before scoring; for crops of two or more tokens that is
          an exact common factor of all scores (eps sits next to the variance mean, which is not
          scaled), so leaving it out changes nothing; only its one-token crops differ: they score the
          raw attention (no 1e3, no alpha), 1000 times less weight than here;
      (7) attention on Qwen2.5-VL: the code takes the attention received at the last ViT block (head
          and query mean, averaged over each 2x2 merge group) but leaves it in the ViT's window order
          while the tokens are put back in raster order; here the adapter's "cls_attention" at the
          feature layer (the same kind of signal, the same block) is aligned with the tokens.
    """

    name = "holov"
    family = "holistic"
    where = "pre"
    signals = ("cls_attention",)
    default_budget = Budget(tokens=64)
    paper = "Zou et al., NeurIPS 2025, arXiv:2510.02912 (HoloV)"

    crop_rows: int = 4
    crop_cols: int = 4
    alpha: float = ALPHA
    beta: float = BETA
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
        check_only_with(
            self, {"alpha": ALPHA, "beta": BETA}, self.rank_by == "score", "rank_by='score'",
            "to weigh the diversity term of the token score, which rank_by='attention' does not rank by (the "
            "crop split sees only alpha + beta, a common factor)",
        )  # fmt: skip

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        device = image.embeds.device
        crops = image_crops(image, self.crop_rows, self.crop_cols, self.layout, self.name)
        attention = image.signals["cls_attention"].to(device)
        scores, crop_scores = holistic_scores(image.embeds, attention, crops, self.alpha, self.beta, self.eps)
        weights = [max(s, 0.0) ** self.power for s in crop_scores.tolist()]
        quotas = allocate_quotas(weights, [c.numel() for c in crops], k)
        rank = scores if self.rank_by == "score" else attention.float().reshape(-1)
        kept = [
            idx.to(device)[topk_sorted(rank[idx.to(device)], q)] for idx, q in zip(crops, quotas) if q > 0
        ]
        return Selection(keep=torch.cat(kept).sort().values)


def image_crops(
    image: ImageTokens, crop_rows: int, crop_cols: int, layout: str, method: str
) -> list[torch.Tensor]:
    """Every crop of the image as (m,) ascending token indices into its n tokens.

    A plain image: `crop_partition` of its grid (a 1 x n strip without one). An image of several units
    (`ImageTokens.units`: an AnyRes base view and tiles, the frames of a video clip): each unit's grid is
    cut into crop_rows x crop_cols crops of its own (a unit without a grid as a strip), so a crop never
    spans two tiles or frames, and the crops of all units are listed together, unit by unit.
    """
    if not image.units:
        h, w = grid_of(image, method)
        return crop_partition(h, w, crop_rows, crop_cols, layout)
    crops = []
    for unit in image.units:
        h, w = unit.grid or (1, unit.index.numel())
        index = unit.index.cpu()
        crops += [index[c] for c in crop_partition(h, w, crop_rows, crop_cols, layout)]
    return crops
