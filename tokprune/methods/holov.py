"""HoloV (Zou et al., NeurIPS 2025): visual token pruning whose budget is shared across spatial crops."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, grid_of, trivial_selection
from tokprune.methods.options import check_choice, check_int, check_number, check_only_with

_LAYOUTS = ("bands", "blocks")
_RANK_BY = ("attention", "score")
_SCORING = ("code", "centred")
_ALLOCATION = ("code", "water_fill")
_UNITS = ("joint", "per_unit")
_CROP_COUNTS = ("fixed", "per_budget")
ALPHA, BETA = 1.0, 0.09  # the authors' code
ATTENTION_SCALE = 1e3  # the code multiplies the attention by this before scoring


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


def code_scores(
    embeds: torch.Tensor,
    attention: torch.Tensor,
    crops: list[torch.Tensor],
    alpha: float = 1.0,
    beta: float = 0.09,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores (n,) and crop scores (len(crops),), float32, as the authors' code computes them.

    In a crop of m >= 2 tokens, with S the cosine-similarity matrix of the crop's features (norms + eps)
    and its diagonal set to 0:
        mu_i = sum_j S_ij / (m - 1),   v_i = sum_j (S_ij - mu_i)^2 / (m - 1)   (j over all m, so the zeroed
        diagonal adds mu_i^2 / (m - 1)),
        A_i = 1e3 * a_i,   lambda = mean_crop |A| / (mean_crop |v| + eps),   s_i = alpha * A_i + beta * v_i * lambda;
    a one-token crop scores its raw attention (no 1e3, no alpha). The crop score is the mean of s.
    """
    x = embeds.float()
    a = attention.float().reshape(-1)
    scores = torch.empty_like(a)
    crop_scores = torch.empty(len(crops), dtype=torch.float32, device=a.device)
    for c, idx in enumerate(crops):
        idx = idx.to(a.device)
        a_c = a[idx]
        m = idx.numel()
        if m < 2:
            s_c = a_c
        else:
            f = x[idx]
            f = f / (f.norm(dim=1, keepdim=True) + eps)
            sim = (f @ f.T) * (1 - torch.eye(m, device=a.device))
            mean = sim.sum(1) / (m - 1)
            var = ((sim - mean[:, None]) ** 2).sum(1) / (m - 1)
            scaled = a_c * ATTENTION_SCALE
            lam = scaled.abs().mean() / (var.abs().mean() + eps)
            s_c = alpha * scaled + beta * (var * lam)
        scores[idx] = s_c
        crop_scores[c] = s_c.mean()
    return scores, crop_scores


def code_quotas(crop_scores: torch.Tensor, k: int, power: float = 1.0, eps: float = 1e-6) -> list[int]:
    """The code's integer shares of k: w = s ** power / (sum(s ** power) + eps), q_c = floor(w_c * k), and
    the k - sum(q) leftover tokens one each to the crops of largest w (ties: lower index). A share may
    exceed its crop (the caller keeps the whole crop; the excess is not re-shared)."""
    w = crop_scores.float() ** power
    w = w / (w.sum() + eps)
    quota = (w * k).floor().long()
    leftover = k - int(quota.sum())
    if leftover > 0:
        quota[torch.sort(w, descending=True, stable=True).indices[:leftover]] += 1
    return quota.tolist()


def crop_count_for(n: int, k: int) -> int:
    """The crop count of the code's Qwen2.5-VL path: max(1, floor((1024 / 576) * n / k))."""
    return max(1, int(((1024 / 576) * n) / k))


def ranked(index: torch.Tensor, rank: torch.Tensor, q: int) -> torch.Tensor:
    """The q tokens of `index` with the largest `rank`, in decreasing rank (ties: lower index first)."""
    return index[torch.sort(rank[index], descending=True, stable=True).indices[:q]]


def emitted_selection(emitted: torch.Tensor) -> Selection:
    """A Selection from the kept indices in the order the code emits them (`Selection.order`)."""
    keep, inverse = emitted.sort()
    return Selection(keep=keep, order=inverse.argsort())


@dataclass
class HoloV(Method):
    """HoloV — Zou, Lu, Wang, Yan, Lyu, Zheng, Zhang, Hu, "Don't Just Chase 'Highlighted Tokens' in
    MLLMs: Revisiting Visual Holistic Context Retention", NeurIPS 2025, arXiv:2510.02912
    (https://arxiv.org/abs/2510.02912; code: https://github.com/obananas/HoloV, commit 1d2e65e9,
    `llava/model/utils.py` `HoloV`, called from `llava/model/llava_arch.py`
    `prepare_inputs_labels_for_multimodal`; `qwen-model-HoloV/utils.py` `HoloV` for Qwen2.5-VL).

    The defaults do what the authors' code does. Per image of n tokens with k to keep:
      1. crops: the image's tokens, in their order, are cut into m = crop_rows * crop_cols = 16 contiguous
         runs ("bands"; `crop_partition`): n // m tokens each, the first n % m runs one longer (a run may
         span two image rows). On LLaVA-NeXT the code runs once on the whole image, base view and unpadded
         tiles concatenated (it leaves out the row-end newlines), so the runs cross from the base view into
         the tiles (`units="joint"`);
      2. scores (`code_scores`): a = [CLS] attention (head mean, the feature layer: LLaVA's penultimate
         ViT layer; on CLS-free ViTs the attention each patch receives); in a crop of m >= 2 tokens
             s_i = alpha * 1e3 a_i + beta * lambda_c * v_i,   lambda_c = mean_c|1e3 a| / (mean_c|v| + eps),
         v_i the variance of token i's cosine similarities to its crop (on the LLM input embeddings, i.e.
         after the projector), taken over the crop's row with its zeroed diagonal; a one-token crop scores
         a_i; the crop score is the mean of s;
      3. budget (`code_quotas`): crop c gets floor(w_c * k) with w = s ** power / (sum s ** power + eps),
         the leftover tokens one each to the crops of largest w; a crop whose share reaches its size is
         kept whole;
      4. each crop keeps its share of top tokens by attention (`rank_by="attention"`): the token score of
         step 2 only weighs the crops, and since lambda rescales the variance to the crop's mean
         attention, mean_c(s) ~ 1e3 (alpha + beta) mean_c(a): the diversity term has almost no effect;
      5. order (`Selection.order`): crop by crop; inside a crop by decreasing attention, a whole crop in
         token order: the order the code hands the tokens to the LLM.
    Where the shares exceed their crops the code keeps fewer than k tokens and pads the image with zero
    embeddings up to k; tokprune keeps exactly k real tokens: the missing ones are the highest-ranked
    tokens not yet kept, emitted last (where the code's padding sits).

    Defaults: 16 crops, alpha = 1, beta = 0.09, power = 1, eps = 1e-6 (the code's), budget 64 tokens (the
    code's LLaVA path hard-codes 16 crops and 64 tokens; the crop count stays 16 at other budgets here).

    Options selecting tokprune's variants (its former defaults: layout="blocks", rank_by="score",
    scoring="centred", allocation="water_fill", units="per_unit"):
      layout="blocks": 2-D crops, a crop_rows x crop_cols partition of the grid into near-equal rectangles
          (`crop_layout`), cut in every unit of a multi-unit image (a block needs a grid);
      rank_by="score": each crop keeps its top tokens by s, so that the diversity term the method is named
          for acts at all (alpha and beta are refused with rank_by="attention", where they only scale the
          crop scores);
      scoring="centred" (`holistic_scores`): the variance over j != i only, without the 1e3 factor (an
          exact common factor for crops of two or more tokens); a one-token crop scores alpha * a_i;
      allocation="water_fill" (`allocate_quotas`): shares proportional to max(s, 0) ** power, capped at
          each crop's size with the excess re-shared, leftover by largest fractional part, exactly k kept;
      units="per_unit": on an image of several units (AnyRes base view and tiles, video frames) each unit
          is cut into its own crops and all crops share k by crop score (no crop spans two units);
      crop_count="per_budget": max(1, floor((1024 / 576) * n / k)) bands, the rule of the code's Qwen2.5-VL
          path (16 at 64 of 576, 8 at 128, 5 at 192); needs layout="bands", units="joint" and the default
          crop_rows / crop_cols.

    Remaining differences from the authors' code:
      (1) exactly k real tokens: where shares exceed their crops the code pads with zero embeddings, which
          tokprune cannot emit; the shortfall is filled with the next tokens by the ranking signal;
      (2) arithmetic in float32 on the LLM input embeddings whatever the model's dtype (the code computes
          the similarities in the model's dtype, fp16 in its scripts); attention ties go to the lower index
          (torch.topk's order on ties is unspecified);
      (3) the crop count is 16 on every model and budget unless crop_count="per_budget": the code's
          Qwen2.5-VL path uses that rule (a method does not know the model family);
      (4) Qwen2.5-VL: the code takes the attention received at the last ViT block but leaves it in the ViT's
          window order while the tokens are in raster order; here the adapter's "cls_attention" (the same
          block) is aligned with the tokens;
      (5) LLaVA-NeXT: the code (the LLaVA repository's anyres path) unpads with its own `unpad_image`
          (int() of the scaled side, where transformers rounds to 7 digits first), so on rare sizes its
          mosaic has one row or column more; tokprune works on the tokens transformers gives the LLM; the
          code handles one AnyRes image per batch, tokprune any number;
      (6) the code's 1e3 factor and eps act only through one-token crops and the eps terms; with
          scoring="code" they are reproduced.
    """

    name = "holov"
    family = "holistic"
    where = "pre"
    signals = ("cls_attention",)
    default_budget = Budget(tokens=64)
    paper = "Zou et al., NeurIPS 2025, arXiv:2510.02912 (HoloV)"
    code_families = ("llava", "llava_next")

    crop_rows: int = 4
    crop_cols: int = 4
    alpha: float = ALPHA
    beta: float = BETA
    power: float = 1.0
    eps: float = 1e-6
    layout: str = "bands"
    rank_by: str = "attention"
    scoring: str = "code"
    allocation: str = "code"
    units: str = "joint"
    crop_count: str = "fixed"

    def __post_init__(self) -> None:
        check_int(self, "crop_rows", 1)
        check_int(self, "crop_cols", 1)
        check_number(self, "alpha", 0)
        check_number(self, "beta", 0)
        check_number(self, "power", 0, low_open=True)
        check_number(self, "eps", 0, low_open=True)
        check_choice(self, "layout", _LAYOUTS)
        check_choice(self, "rank_by", _RANK_BY)
        check_choice(self, "scoring", _SCORING)
        check_choice(self, "allocation", _ALLOCATION)
        check_choice(self, "units", _UNITS)
        check_choice(self, "crop_count", _CROP_COUNTS)
        check_only_with(
            self, {"alpha": ALPHA, "beta": BETA}, self.rank_by == "score", "rank_by='score'",
            "to weigh the diversity term of the token score, which rank_by='attention' does not rank by (the "
            "crop split sees only alpha + beta, a common factor)",
        )  # fmt: skip
        check_only_with(
            self, {"crop_rows": 4, "crop_cols": 4, "layout": "bands", "units": "joint"},
            self.crop_count == "fixed", "crop_count='fixed'",
            "to shape the crops, which crop_count='per_budget' sizes from n / k as joint bands",
        )  # fmt: skip

    def select(self, image: ImageTokens, k: int) -> Selection:
        if (trivial := trivial_selection(image, k)) is not None:
            return trivial
        device = image.embeds.device
        crops = self.crops(image, k)
        attention = image.signals["cls_attention"].to(device).float().reshape(-1)
        scoring = code_scores if self.scoring == "code" else holistic_scores
        scores, crop_scores = scoring(image.embeds, attention, crops, self.alpha, self.beta, self.eps)
        sizes = [c.numel() for c in crops]
        if self.allocation == "code":
            quotas = code_quotas(crop_scores, k, self.power, self.eps)
        else:
            weights = [max(s, 0.0) ** self.power for s in crop_scores.tolist()]
            quotas = allocate_quotas(weights, sizes, k)
        rank = scores if self.rank_by == "score" else attention
        kept = []
        for idx, q, size in zip(crops, quotas, sizes):
            idx = idx.to(device)
            if q >= size:
                kept.append(idx)
            elif q > 0:
                kept.append(ranked(idx, rank, q))
        emitted = torch.cat(kept)
        if emitted.numel() < k:  # shares beyond their crops: the code pads with zeros, here the next tokens
            rest = torch.ones(image.n, dtype=torch.bool, device=device)
            rest[emitted] = False
            emitted = torch.cat([emitted, ranked(rest.nonzero().squeeze(1), rank, k - emitted.numel())])
        return emitted_selection(emitted)

    def crops(self, image: ImageTokens, k: int) -> list[torch.Tensor]:
        """The image's crops, each (m,) ascending token indices (`image_crops`)."""
        if self.crop_count == "per_budget":
            return crop_partition(1, image.n, crop_count_for(image.n, k), 1, "bands")
        return image_crops(image, self.crop_rows, self.crop_cols, self.layout, self.name, self.units)


def image_crops(
    image: ImageTokens, crop_rows: int, crop_cols: int, layout: str, method: str, units: str = "per_unit"
) -> list[torch.Tensor]:
    """Every crop of the image as (m,) ascending token indices into its n tokens.

    A plain image: `crop_partition` of its grid (a 1 x n strip without one). An image of several units
    (`ImageTokens.units`: an AnyRes base view and tiles, the frames of a video clip): with layout "bands"
    and units "joint", bands over all its n tokens in their order (as the authors' code cuts a LLaVA-NeXT
    image); otherwise each unit's grid is cut into crop_rows x crop_cols crops of its own (a unit without
    a grid as a strip), so a crop never spans two tiles or frames, listed unit by unit.
    """
    if not image.units or (layout == "bands" and units == "joint"):
        h, w = grid_of(image, method)
        return crop_partition(h, w, crop_rows, crop_cols, layout)
    crops = []
    for unit in image.units:
        h, w = unit.grid or (1, unit.index.numel())
        index = unit.index.cpu()
        crops += [index[c] for c in crop_partition(h, w, crop_rows, crop_cols, layout)]
    return crops
