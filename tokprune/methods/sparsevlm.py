"""SparseVLM: text-guided, progressive visual-token sparsification inside the LLM (with optional recycling)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens, LLMMethod, Selection, topk_sorted
from tokprune.methods.options import check_bool, check_int, check_int_tuple, check_number

SIGNAL = "text_query_attention"
# Published per-stage kept visual tokens of LLaVA-1.5 (576 per image, 32 layers), pruning after layers
# 2, 6, 15, for the paper's "64", "128" and "192" settings: the schedule of the authors' public v1 code
# (Gumpest/SparseVLMs, llava/model/language_model/score.py); "192" = 300/200/110 as in DESIGN §7.
PUBLISHED_TOKENS = 576
PUBLISHED_DEPTH = 32
PUBLISHED_LAYERS = (2, 6, 15)
PUBLISHED_SCHEDULES = ((66, 30, 17), (303, 110, 36), (300, 200, 110))


def schedule_fractions(final: Fraction) -> list[Fraction]:
    """Kept fraction of an image after each of the 3 stages, for a final kept fraction `final` in [0, 1].

    Piecewise-linear in `final` through the knots (0, 0, 0), the three published schedules (as fractions of
    576) and (1, 1, 1); the last entry is `final` itself, so the published schedules are reproduced exactly.
    """
    knots = [(Fraction(0), (Fraction(0),) * 3)]
    knots += [
        (Fraction(s[-1], PUBLISHED_TOKENS), tuple(Fraction(c, PUBLISHED_TOKENS) for c in s))
        for s in PUBLISHED_SCHEDULES
    ]
    knots.append((Fraction(1), (Fraction(1),) * 3))
    for (x0, y0), (x1, y1) in zip(knots, knots[1:]):
        if final <= x1:
            t = (final - x0) / (x1 - x0)
            return [a + t * (b - a) for a, b in zip(y0, y1)]
    return [Fraction(1)] * 3


def rater_scores(attention: torch.Tensor) -> torch.Tensor:
    """Score of each visual token from the attention text tokens pay it.

    attention: (m, n) head-mean attention of m text tokens (rows) to the n visual tokens of one image.
    Raters = text tokens whose total attention to the image exceeds the mean over the m text tokens (all of
    them if none does). Returns (n,) float32: the mean attention the raters pay each visual token.
    """
    attention = attention.float()
    relevance = attention.sum(1)  # (m,)
    raters = relevance > relevance.mean()
    if not bool(raters.any()):
        raters = torch.ones_like(raters)
    return attention[raters].mean(0)


def density_peak_clusters(x: torch.Tensor, clusters: int, knn: int = 5) -> torch.Tensor:
    """DPC-kNN (density peaks with k nearest neighbours): cluster labels (r,) in [0, clusters) of x (r, D).

    Distances are Euclidean / sqrt(D); density = exp(-mean squared distance to the knn nearest neighbours);
    delta = distance to the nearest denser token (ties: the lower index is denser), the largest distance
    for the densest one; centres = the `clusters` largest density * delta; every token joins its nearest
    centre (each centre its own cluster, so none is empty). Deterministic.
    """
    r = x.shape[0]
    if clusters >= r:
        return torch.arange(r, device=x.device)
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(x.shape[1])  # (r, r)
    nearest = dist.sort(dim=1).values[:, 1 : min(knn, r - 1) + 1]  # column 0 is the token itself
    density = torch.exp(-(nearest**2).mean(1))
    index = torch.arange(r, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # [i, j]: j is denser than i
    delta = dist.masked_fill(~denser, float("inf")).min(1).values
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = topk_sorted(density * delta, clusters)
    labels = dist[:, centres].argmin(1)
    labels[centres] = torch.arange(clusters, device=x.device)
    return labels


def recycle_into_kept(
    embeds: torch.Tensor,
    scores: torch.Tensor,
    keep: torch.Tensor,
    ratio: float = 0.3,
    cluster_size: int = 10,
) -> torch.Tensor:
    """Kept tokens' hidden states after absorbing the recycled dropped tokens: (k, D) float32.

    embeds: (n, D); scores: (n,); keep: (k,) sorted kept indices. The ceil(ratio * n_dropped) best-scored
    dropped tokens are grouped into r // cluster_size + 1 clusters (`density_peak_clusters`); each cluster
    goes to the kept token whose state is most cosine-similar to the cluster mean (ties: lower index); a kept
    token's new state is the mean over itself and the members of the clusters it received (i.e. its state
    and the cluster means, weighted by cluster size).
    """
    dropped = torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    dropped[keep] = False
    dropped = dropped.nonzero().squeeze(1)
    kept = embeds[keep].float()
    if dropped.numel() == 0 or keep.numel() == 0:
        return kept
    n_recycled = math.ceil(ratio * dropped.numel() - 1e-9)
    recycled = dropped[topk_sorted(scores[dropped], n_recycled)]
    members = embeds[recycled].float()  # (r, D)
    n_clusters = min(n_recycled, n_recycled // cluster_size + 1)
    labels = density_peak_clusters(members, n_clusters)
    sums = torch.zeros(n_clusters, members.shape[1], device=members.device).index_add_(0, labels, members)
    sizes = torch.bincount(labels, minlength=n_clusters).to(members.dtype)
    target = (F.normalize(sums / sizes[:, None], dim=-1) @ F.normalize(kept, dim=-1).T).argmax(1)  # (c,)
    totals = kept.clone().index_add_(0, target, sums)
    counts = torch.ones(kept.shape[0], device=kept.device).index_add_(0, target, sizes)
    return totals / counts[:, None]


@dataclass
class SparseVLM(LLMMethod):
    """SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", ICML 2025 (arXiv:2410.04417).

    Three stages, after LLM layers `layers` (default (2, 6, 15) for a 32-layer LLM, scaled to L/32 and made
    strictly increasing otherwise): the attention module of such a layer gives, recomputed from its own q/k
    projections and post-RoPE keys (no eager attention), the head-mean softmax rows of the instruction's
    text tokens (the row's text after its last image; the last prompt token if there is none) over all real
    keys of their causal rows. Per image, raters = the text tokens whose attention to the image's remaining
    tokens exceeds the mean over the text tokens; a visual token's score = the mean attention the raters pay
    it; the top tokens by score are kept, and layers after the stage's layer see only them.

    Stage counts: `budget`/`keep_ratio` = the final count f of an image of n tokens (default keep_ratio
    110/576, the paper's "192" setting). The published LLaVA-1.5 schedules, kept tokens after each stage of
    576, are 66/30/17 ("64"), 303/110/36 ("128") and 300/200/110 ("192"; the names are nominal: with the
    stages after layers 2, 6, 15 the layer-averaged count of 300/200/110 is (3·576 + 4·300 + 9·200 +
    16·110) / 32 ≈ 203, without recycled tokens). For other f and n, each stage's kept fraction is
    interpolated piecewise-linearly in f/n through (0, 0, 0), the three schedules and (1, 1, 1), then
    ceil(fraction * n), so budgets 17/36/110 of 576 give exactly the published counts; e.g. 64 of 576 gives
    302/145/64.

    `recycle=True` (v1 token recycling): at every stage the ceil(`recycle_ratio` * dropped) best-scored
    dropped tokens are grouped into r // `cluster_size` + 1 clusters by density-peak clustering (DPC-kNN,
    k = 5) of their hidden states, and their means are recycled (see `recycle_into_kept`).

    Deliberate differences: (1) raters are chosen by attention at each stage's layer (the catalogue's
    definition); the public code picks them once from the LLM input embeddings (a visual-to-text softmax of
    dot products); (2) the budget is the exact final count, with fixed (interpolated) counts instead of the
    paper's rank-adaptive deletion counts, as the public code does; (3) recycled clusters are merged into the
    most similar kept token (the mean over that token and the recycled members it receives) instead of being
    inserted as extra tokens, so every stage keeps exactly its count and every token its original position;
    merged runs are checked against this definition, not against the masked reference; (4) ceil(0.3 *
    dropped) tokens are recycled (the public code takes floor(0.3 * dropped) + 1).
    """

    name = "sparsevlm"
    signals = (SIGNAL,)
    default_budget = Budget(ratio=110 / 576)
    paper = "Zhang et al., ICML 2025 (SparseVLM)"
    layers: tuple[int, ...] | None = None
    recycle: bool = False
    recycle_ratio: float = 0.3
    cluster_size: int = 10

    def __post_init__(self) -> None:
        check_int_tuple(self, "layers", len(PUBLISHED_LAYERS))
        check_bool(self, "recycle")
        check_number(self, "recycle_ratio", 0, 1, low_open=True)
        check_int(self, "cluster_size", 1)

    def boundaries(self, num_layers: int) -> list[int]:
        """Stage boundaries: each stage's scoring layer + 1 (layers after it see the kept tokens)."""
        layers = list(self.layers) if self.layers is not None else _scaled_layers(num_layers)
        if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] > num_layers - 2:
            raise MethodOptionError(
                f"sparsevlm: layers {tuple(layers)} must be strictly increasing in [0, {num_layers - 2}] "
                f"for this {num_layers}-layer LLM (the last layer has no later layer to prune for)"
            )
        return [layer + 1 for layer in layers]

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        final = budget.kept(n)
        if final >= n:
            return [n] * len(PUBLISHED_LAYERS)
        fractions = schedule_fractions(Fraction(final, n))
        return [min(n, max(final, math.ceil(f * n))) for f in fractions[:-1]] + [final]

    def scores(self, image: ImageTokens) -> torch.Tensor:
        """(n,) rater scores of one image's tokens from the "text_query_attention" signal.

        image.signals[SIGNAL]: (n, T), column t = attention of the row's t-th instruction token;
        image.text[SIGNAL]: (m, T), one row per instruction token, so columns >= m are padding. With m = 0
        column 0 holds the row's last token, the only rater.
        """
        attention = image.signals[SIGNAL]
        text = image.text.get(SIGNAL)
        m = text.shape[0] if text is not None else attention.shape[1]
        return rater_scores(attention[:, : max(m, 1)].T)

    def select(self, image: ImageTokens, k: int) -> Selection:
        scores = self.scores(image)
        keep = topk_sorted(scores, k)
        if not self.recycle:
            return Selection(keep=keep)
        merged = recycle_into_kept(image.embeds, scores, keep, self.recycle_ratio, self.cluster_size)
        return Selection(keep=keep, merged=merged.to(image.embeds.dtype))


def _scaled_layers(num_layers: int) -> list[int]:
    """The published layers (2, 6, 15) of 32 scaled to `num_layers`, rounded, then made strictly increasing."""
    layers: list[int] = []
    for layer in PUBLISHED_LAYERS:
        scaled = math.floor(layer * num_layers / PUBLISHED_DEPTH + 0.5)
        layers.append(max(scaled, layers[-1] + 1) if layers else scaled)
    return layers
