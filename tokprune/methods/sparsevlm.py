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
from tokprune.methods.options import (
    check_bool,
    check_choice,
    check_int,
    check_int_tuple,
    check_number,
    check_only_with,
)

SIGNAL = "text_query_attention"
RELEVANCE = "input_text_relevance"
_RATERS = ("embeddings", "attention")
RECYCLE_DEFAULTS = {"recycle_ratio": 0.3, "cluster_size": 10}  # tau = 30%, theta = 1/10 (§3.3)
# Published per-stage kept visual tokens of LLaVA-1.5 (576 per image, 32 layers), pruning after layers
# 2, 6, 15, for the paper's "64", "128" and "192" settings: the schedule of the authors' public v1 code
# (Gumpest/SparseVLMs, llava/model/language_model/score.py); the paper's text gives neither the layers
# nor the counts.
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


def rater_scores(attention: torch.Tensor, raters: torch.Tensor | None = None) -> torch.Tensor:
    """Score of each visual token from the attention the raters among the text tokens pay it.

    attention: (m, n) head-mean attention of m text tokens (rows) to the n visual tokens of one image;
    raters: (m,) bool, the rating text tokens, or None to choose them from `attention` itself: the text
    tokens whose attention to the image is at least the mean over the m text tokens (the ">= mean" rule of
    the paper's Eq. 5 applied to these rows; all of them should rounding leave none). Returns (n,) float32:
    the mean attention the raters pay each visual token (Eq. 3 over the raters' rows).
    """
    attention = attention.float()
    if raters is None:
        raters = mean_or_above(attention.sum(1))  # (m,): n times the mean over the image's tokens
    return attention[raters].mean(0)


def mean_or_above(relevance: torch.Tensor) -> torch.Tensor:
    """(m,) bool: the entries at least the mean of `relevance` (m,) (Eq. 5-6); all where rounding leaves none."""
    raters = relevance >= relevance.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def density_peaks(x: torch.Tensor, clusters: int, knn: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN (density peaks with k nearest neighbours) of x (r, D), as the paper's Eq. 8-9.

    Returns (centres, labels): centres (c,) ascending indices into x, labels (r,) in [0, c), centre j
    labelled j. Distances are plain Euclidean; density rho = exp(-mean squared distance to the `knn`
    nearest other tokens); delta = distance to the nearest denser token (ties: the lower index is denser),
    for the densest one its largest distance to any token; centres = the c largest rho * delta (ranked as
    log rho + log delta, which orders the same without underflow; ties: lower index); every other token
    joins the centre of largest cosine similarity (ties: the lower centre). Deterministic.
    """
    r = x.shape[0]
    index = torch.arange(r, device=x.device)
    if clusters >= r:
        return index, index.clone()
    x = x.float()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # (r, r), exact differences
    eye = torch.eye(r, dtype=torch.bool, device=x.device)
    nearest = dist.masked_fill(eye, float("inf")).sort(dim=1).values[:, : min(knn, r - 1)]
    log_density = -(nearest**2).mean(1)  # log rho (Eq. 8)
    denser = (log_density[None, :] > log_density[:, None]) | (
        (log_density[None, :] == log_density[:, None]) & (index[None, :] < index[:, None])
    )  # [i, j]: j is denser than i
    delta = dist.masked_fill(~denser, float("inf")).min(1).values
    delta = torch.where(torch.isinf(delta), dist.max(1).values, delta)  # Eq. 9
    centres = topk_sorted(log_density + torch.log(delta), clusters)
    similarity = F.normalize(x, dim=-1) @ F.normalize(x[centres], dim=-1).T  # (r, c)
    labels = similarity.argmax(1)
    labels[centres] = torch.arange(clusters, device=x.device)
    return centres, labels


def density_peak_clusters(x: torch.Tensor, clusters: int, knn: int = 5) -> torch.Tensor:
    """The cluster labels (r,) of `density_peaks`."""
    return density_peaks(x, clusters, knn)[1]


def recycle_select(
    embeds: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    ratio: float = 0.3,
    cluster_size: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token recycling within a budget of k slots: (keep (k,) sorted indices, their states (k, D) float32).

    embeds: (n, D); scores: (n,). With N = n - k (the tokens the stage removes), r = ceil(ratio * N)
    tokens are recycled into c = min(r // cluster_size + 1, r, k) reconstructed tokens, which take c of
    the k slots: the k - c best-scored tokens are kept as they are, the r best-scored of the others are
    clustered (`density_peaks`), and each cluster becomes one token, the mean of its members' states, at
    the position of its centre. Ranking ties: the lower index first.
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    removed = embeds.shape[0] - k
    if removed <= 0 or k <= 0:
        keep = order[:k].sort().values
        return keep, embeds[keep].float()
    n_recycled = math.ceil(ratio * removed - 1e-9)
    clusters = min(n_recycled // cluster_size + 1, n_recycled, k)
    kept = order[: k - clusters]
    recycled = order[k - clusters : k - clusters + n_recycled]
    members = embeds[recycled].float()  # (r, D)
    centres, labels = density_peaks(members, clusters)
    sums = torch.zeros(clusters, members.shape[1], device=members.device).index_add_(0, labels, members)
    sizes = torch.bincount(labels, minlength=clusters).to(members.dtype)
    slots = torch.cat([kept, recycled[centres]])
    states = torch.cat([embeds[kept].float(), sums / sizes[:, None]])
    keep, perm = slots.sort()
    return keep, states[perm]


@dataclass
class SparseVLM(LLMMethod):
    """SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", ICML 2025 (arXiv:2410.04417; section and equation numbers of the camera-ready, v4).

    What the paper specifies. §3.2: the priority matrix P (Eq. 2) is the block of a decoder layer's
    attention map (Eq. 1) with the language-instruction tokens as queries (rows) and the image tokens as
    keys (columns); a visual token's significance (Eq. 3) is the mean of its column over the rows, i.e. over
    the raters (App. B: the mean attention of the selected raters). The raters (Eq. 4-6) are chosen once,
    before the decoder, from the LLM-input embeddings: each instruction token gets the mean over the visual
    tokens of Softmax(H_v H_q^T), and those at or above the mean of these values rate (Eq. 5 and App. B
    write >=, the prose says "exceed"). Eq. 7: a layer deletes N = lambda * (L_v - rank(P)) tokens, those
    with the smallest significance, and is skipped when N = 0 (the flash-attention path of App. B keeps a
    top-k). §3.3: of the deleted tokens, the top tau (%) by significance are recycled (L_r = tau * N);
    they are grouped by density peaks with k nearest neighbours (Eq. 8: rho = exp of minus the mean squared
    L2 distance to the k neighbours; Eq. 9: delta = the distance to the nearest denser token, the largest
    distance for the densest; centres = the highest rho * delta, C = theta * L_r of them), the others join
    the centre of highest cosine similarity, and each group becomes one token (Eq. 10: an element-wise sum;
    App. C: a weighted sum), which goes on into the later layers (§3.4 counts N - C tokens removed). The
    text gives no value of lambda, tau, theta, k or the rank threshold, nor the layers or the per-layer
    counts of its "192/128/64" settings.

    From the authors' public v1 code (Gumpest/SparseVLMs, llava/model/language_model/): the three
    sparsification layers 2, 6, 15 (of LLaVA-1.5's 32), each pruning its own output with its head-mean
    attention; fixed per-layer counts instead of Eq. 7 (score.py: 66/30/17, 303/110/36, 300/200/110 of
    576 for "64", "128", "192"); raters strictly above the mean; recycling always on, of floor(0.3 *
    deleted) + 1 tokens into recycled // 10 + 1 clusters, each the mean of its members (weights 1 / size),
    inserted as extra tokens after the kept visual ones. The raters are chosen once, before the first
    decoder layer, from the LLM-input hidden states as the paper says (softmax over the text tokens of the
    unscaled products of visual and text states, mean over the visual tokens, above the mean).

    Here: stages after LLM layers `layers` (default (2, 6, 15) for a 32-layer LLM, scaled to L/32 and made
    strictly increasing otherwise). The attention module of such a layer gives, recomputed from its own q/k
    projections and post-RoPE keys (no eager attention), the head-mean softmax rows of the instruction's
    text tokens (the row's text after its last image; the last prompt token if there is none) over all real
    keys of their causal rows. Raters (`raters="embeddings"`, the default, Eq. 4-6): per image, once, on
    the LLM input (after any pre-LLM stage), r_t = mean over the image's visual tokens v of softmax over
    the instruction tokens t of <h_v, h_t> (the "input_text_relevance" signal), and the tokens with r_t >=
    mean(r) rate at every stage. `raters="attention"` instead re-chooses them at each stage from that
    layer's rows: the text tokens whose attention to the image's remaining tokens is at least the mean
    over the text tokens (the same threshold on the attention softmax over keys). A visual token's score
    = the mean attention the raters pay it at the stage's layer (Eq. 3); the top tokens by score are
    kept, and layers after the stage's layer see only them.

    Stage counts: `budget`/`keep_ratio` = the final count f of an image of n tokens (default keep_ratio
    110/576, the paper's "192"). The published schedules are the counts above (the names are nominal: with
    stages after layers 2, 6, 15 the layer-averaged count of 300/200/110 is (3·576 + 4·300 + 9·200 +
    16·110) / 32 ≈ 203, without recycled tokens). For other f and n, each stage's kept fraction is
    interpolated piecewise-linearly in f/n through (0, 0, 0), the three schedules and (1, 1, 1), then
    ceil(fraction * n), so budgets 17/36/110 of 576 give exactly the published counts; e.g. 64 of 576 gives
    302/145/64.

    `recycle=True` (§3.3): at every stage, of the N = n - k tokens the stage's count k removes, r =
    ceil(`recycle_ratio` * N) (tau = 30%) are recycled into c = min(r // `cluster_size` + 1, r, k) tokens
    (theta = 1/10, plus one, as the code); the k - c best-scored tokens are kept as they are, the r
    best-scored of the rest are clustered by `density_peaks` (Eq. 8-9 with k = 5 neighbours, cosine
    assignment) of their hidden states, and each cluster becomes one token, the mean of its members, at
    its centre's position (see `recycle_select`). `recycle_ratio` and `cluster_size` only act with
    `recycle=True`: setting either to another value without it is an error.

    Deliberate differences: (1) raters are chosen per image (the paper and the code have one image per
    prompt), with the paper's >= (the code: >); (2) fixed (interpolated) counts as the public code, not Eq. 7's
    rank-adaptive ones, so the budget is an exact final count; (3) the c reconstructed tokens take c of the
    stage's k slots (the code adds them on top of its counts), so every stage keeps exactly its count and
    every token sits at an original position; (4) a cluster's token is the mean of its members (the code's
    weighting), not Eq. 10's plain sum, which would scale the token's norm with the cluster size; (5)
    ceil(0.3 * N) tokens are recycled (the code: floor(0.3 * N) + 1); (6) the paper leaves k open and the
    code takes the c nearest tokens counting the token itself (a constant density when c = 1): here the
    5 nearest others; the code also scales distances by 1 / sqrt(D) and assigns tokens by Euclidean
    distance, here Eq. 8-9 and the cosine rule are taken as written; density ties go to the lower index
    (the code adds random noise); (7) recycling is opt-in (a repository default kept as it was), while
    the paper's main results use it (Table 4 ablates it) and the code always recycles.
    """

    name = "sparsevlm"
    family = "text-guided, progressive"
    default_budget = Budget(ratio=110 / 576)
    paper = "Zhang et al., ICML 2025 (SparseVLM)"
    layers: tuple[int, ...] | None = None
    raters: str = "embeddings"
    recycle: bool = False
    recycle_ratio: float = RECYCLE_DEFAULTS["recycle_ratio"]
    cluster_size: int = RECYCLE_DEFAULTS["cluster_size"]

    def __post_init__(self) -> None:
        check_int_tuple(self, "layers", len(PUBLISHED_LAYERS))
        check_choice(self, "raters", _RATERS)
        check_bool(self, "recycle")
        check_number(self, "recycle_ratio", 0, 1, low_open=True)
        check_int(self, "cluster_size", 1)
        check_only_with(self, RECYCLE_DEFAULTS, self.recycle, "recycle=True", "to size the recycled clusters")

    @property
    def signals(self) -> tuple[str, ...]:  # type: ignore[override]
        return (SIGNAL, RELEVANCE) if self.raters == "embeddings" else (SIGNAL,)

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
        """(n,) rater scores of one image's tokens.

        image.signals["text_query_attention"]: (n, T), column t = attention of the row's t-th instruction
        token; image.text["text_query_attention"]: (m, T), one row per instruction token, so columns >= m
        are padding (m = 0: column 0 holds the row's last token, the only rater). With raters="embeddings",
        image.signals["input_text_relevance"]: (n, T), every row the image's relevance r (Eq. 4) of the
        instruction tokens, from the LLM input; raters = r >= mean(r) over the m columns.
        """
        attention = image.signals[SIGNAL]
        text = image.text.get(SIGNAL)
        m = max(text.shape[0] if text is not None else attention.shape[1], 1)
        raters = None
        if self.raters == "embeddings":
            raters = mean_or_above(image.signals[RELEVANCE][0, :m].float())
        return rater_scores(attention[:, :m].T, raters)

    def select(self, image: ImageTokens, k: int) -> Selection:
        scores = self.scores(image)
        if not self.recycle:
            return Selection(keep=topk_sorted(scores, k))
        keep, merged = recycle_select(image.embeds, scores, k, self.recycle_ratio, self.cluster_size)
        return Selection(keep=keep, merged=merged.to(image.embeds.dtype))


def _scaled_layers(num_layers: int) -> list[int]:
    """The published layers (2, 6, 15) of 32 scaled to `num_layers`, rounded, then made strictly increasing."""
    layers: list[int] = []
    for layer in PUBLISHED_LAYERS:
        scaled = math.floor(layer * num_layers / PUBLISHED_DEPTH + 0.5)
        layers.append(max(scaled, layers[-1] + 1) if layers else scaled)
    return layers
