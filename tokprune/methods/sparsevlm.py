"""SparseVLM: text-guided, progressive visual-token sparsification inside the LLM, with token recycling."""

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
    check_choice,
    check_int,
    check_int_tuple,
    check_number,
    check_only_with,
)

SIGNAL = "text_query_attention"
RELEVANCE = "input_text_relevance"
_RATERS = ("embeddings", "attention")
RATER_RULES = ("above", "at_least")  # the code's "> mean"; the paper's Eq. 5 ">= mean"
RECYCLE = ("code", "within", "off")
RECYCLE_DEFAULTS = {"recycle_ratio": 0.3, "cluster_size": 10}  # tau = 30%, theta = 1/10 (§3.3)
MERGE_EPS = 1e-6  # the code's cluster weights 1 / (size + 1e-6)
# Per-stage top-k counts of LLaVA-1.5 (576 per image, 32 layers), pruning the outputs of layers 2, 6, 15,
# for the "64", "128" and "192" settings: the schedule of the authors' v1.5 code (Gumpest/SparseVLMs,
# branch v1.5, llava/model/language_model/score.py: sparse_token_dict); the paper's text gives neither the
# layers nor the counts. The recycled tokens come on top of these counts (`SparseVLM`).
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


def rater_scores(
    attention: torch.Tensor, raters: torch.Tensor | None = None, strict: bool = False
) -> torch.Tensor:
    """Score of each visual token from the attention the raters among the text tokens pay it.

    attention: (m, n) head-mean attention of m text tokens (rows) to the n visual tokens of one image;
    raters: (m,) bool, the rating text tokens, or None to choose them from `attention` itself: the text
    tokens whose attention to the image is at least the mean over the m text tokens (the ">= mean" rule of
    the paper's Eq. 5 applied to these rows; above it with `strict`; all of them should none qualify).
    Returns (n,) float32: the mean attention the raters pay each visual token (Eq. 3 over the raters' rows).
    """
    attention = attention.float()
    if raters is None:
        raters = mean_or_above(attention.sum(1), strict)  # (m,): n times the mean over the image's tokens
    return attention[raters].mean(0)


def mean_or_above(relevance: torch.Tensor, strict: bool = False) -> torch.Tensor:
    """(m,) bool: the entries at least (strict: above) the mean of `relevance` (m,) (Eq. 5-6; the code's
    "> mean"); all of them where none qualifies (equal values: the code would have no rater at all)."""
    mean = relevance.mean()
    raters = relevance > mean if strict else relevance >= mean
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
    x = x.float().detach()  # the clustering only selects
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
    """recycle="within": token recycling within a budget of k slots (tokprune's earlier reading of §3.3):
    (keep (k,) sorted indices, their states (k, D) float32).

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


def code_recycled(removed: int, ratio: float = 0.3, cluster_size: int = 10) -> tuple[int, int]:
    """(r, c): of `removed` = N dropped tokens, the code recycles r = int(N * ratio) + 1 into c = int(r /
    cluster_size) + 1 clusters (Python float arithmetic, as the code; r <= N and c <= r); (0, 0) if N = 0."""
    if removed <= 0:
        return 0, 0
    recycled = min(int(removed * ratio) + 1, removed)
    return recycled, min(int(recycled / cluster_size) + 1, recycled)


def code_split(n: int, count: int, ratio: float = 0.3, cluster_size: int = 10) -> tuple[int, int]:
    """(k, c) with k + c = count: the stage keeps its k best tokens and adds c recycled ones, c the code's
    cluster count for the N = n - k tokens it drops. k + c(n - k) grows by 0 or 1 with k, so every count
    from c(n) to n has such a k; where two do, the larger. Below c(n): k = 0 and c = count clusters."""
    for k in range(min(count, n - 1), -1, -1):
        if k + code_recycled(n - k, ratio, cluster_size)[1] <= count:
            return k, count - k
    return 0, count


def code_clusters(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The code's density-peak clustering and merge of x (r, D), rows in the code's order (best score first).

    Distances ||x_i - x_j|| / sqrt(D); density rho_i = exp(-mean of the squared distances to its `clusters`
    nearest tokens, itself included); delta_i = the distance to the nearest denser token, the largest
    distance of all for the densest (ties in rho: the earlier row is denser, where the code adds 1e-6
    uniform noise); centres = the `clusters` largest rho * delta, in that order (ties: the earlier row);
    every other token joins its nearest centre (Euclidean; ties: the earlier centre), and a cluster's token
    is sum_i x_i / (size + 1e-6). Returns (centres (c,) rows of x in the code's cluster order, labels (r,)
    in [0, c), merged (c, D) float32).
    """
    r, width = x.shape
    x = x.float()
    plain = x.detach()  # the clustering only selects; the merge below keeps x's gradient
    dist = torch.cdist(plain, plain, compute_mode="donot_use_mm_for_euclid_dist") / width**0.5  # (r, r)
    nearest = dist.sort(dim=1).values[:, :clusters]  # the token itself first, at distance 0
    density = torch.exp(-(nearest**2).mean(1))
    index = torch.arange(r, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )  # [i, j]: j is denser than i
    delta = dist.masked_fill(~denser, float(dist.max())).min(1).values
    centres = torch.sort(delta * density, descending=True, stable=True).indices[:clusters]
    labels = dist[centres].argmin(0)  # (r,): the first nearest centre
    labels[centres] = torch.arange(clusters, device=x.device)
    sizes = torch.bincount(labels, minlength=clusters).to(x.dtype)
    weights = 1.0 / (sizes + MERGE_EPS)
    merged = torch.zeros(clusters, width, device=x.device).index_add_(0, labels, x * weights[labels, None])
    return centres, labels, merged


def code_recycle_select(
    embeds: torch.Tensor, scores: torch.Tensor, count: int, ratio: float = 0.3, cluster_size: int = 10
) -> Selection:
    """A stage of the code with recycling: `count` = k + c slots of the n tokens (embeds (n, D), scores (n,)).

    (k, c) = `code_split`; the k best-scored tokens stay as they are; of the others, the r best-scored
    (`code_recycled`) are clustered (`code_clusters`) into c tokens, each put in its centre's slot (a dropped
    token's). Ranking ties: the lower index first. The Selection's `order` lists the k tokens in their own
    order, then the c cluster tokens in the code's cluster order (the code appends them after the kept
    visual tokens); `extra` marks the cluster slots; `merged` holds every kept slot's state (float32 rows
    cast back to embeds' dtype).
    """
    n = embeds.shape[0]
    k, clusters = code_split(n, count, ratio, cluster_size)
    ranked = torch.sort(scores.float(), descending=True, stable=True).indices
    top = ranked[:k].sort().values
    recycled = ranked[k : k + code_recycled(n - k, ratio, cluster_size)[0]]
    centres, _, merged = code_clusters(embeds[recycled], clusters)
    emitted = torch.cat([top, recycled[centres]])  # the code's order
    keep, perm = emitted.sort()
    states = torch.cat([embeds[top].float(), merged])[perm]
    return Selection(keep=keep, merged=states.to(embeds.dtype), order=perm.argsort(), extra=perm >= k)


@dataclass
class SparseVLM(LLMMethod):
    """SparseVLM — Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", ICML 2025 (arXiv:2410.04417; section and equation numbers of the camera-ready, v4).

    The default follows the authors' v1.5 code, the version their README presents (github.com/Gumpest/
    SparseVLMs, branch v1.5 at 734d9003879689713a132b83297dfad060a5c9af, code as of tag v1.5 b9619e6 and
    commit 535f8ba: llava/model/language_model/modelling_sparse_llama.py `LlamaDynamicvitModel.forward`
    and `LlamaDynamicvitFlashAttention2.forward`, score.py `attn_postprocess_topk`, utils.py
    `cluster_and_merge`). On LLaVA-1.5 (576 tokens, 32 layers) it does, for one image:
      * raters, once, on the LLM input: m = (H_v H_t^T).softmax over the text t (every token after the
        image) .mean over the visual tokens v (unscaled products); the text tokens with m > mean(m) rate;
      * after decoder layers 2, 6 and 15 (each pruning its own output): that layer's attention
        softmax(q k^T / sqrt(d)) over all causal keys, head mean, the raters' rows at the current visual
        tokens, mean over the raters = each visual token's score; torch.topk of sparse_token_dict[budget]
        = 300/200/110 ("192"), 303/110/36 ("128"), 66/30/17 ("64"), at most v_num - 1;
      * recycling, always: of the N dropped tokens the int(0.3 N) + 1 best-scored (their hidden states, the
        layer's output) are clustered into int(r / 10) + 1 (`code_clusters`: k = c nearest neighbours,
        distances / sqrt(D), Euclidean assignment, mean with weights 1 / (size + 1e-6)); the cluster
        tokens are inserted after the kept visual tokens and count as visual tokens of the next stage
        (300 + 9 = 309 -> 200 + 4 = 204 -> 110 + 3 = 113 tokens for "192");
      * the kept sequence is renumbered 0, 1, ... (position_ids[:, :L']) for the later layers.
    The authors' v1 code (first commit 91fb6d9857a089a39c660527519c76ab0a259349) chose its counts per image
    as int(scale * rank(P) + bias) of the raters' attention block P after layers 2, 6, 15 and 19 (README:
    scale 13.5 / 9 / 0.8, bias 0 / 6 / 0 for 192 / 128 / 64), otherwise as v1.5. The paper (§3.2-3.4):
    raters r >= mean(r) (Eq. 5), per-layer deletion N = lambda (L_v - rank(P)) (Eq. 7), recycling of the
    top tau of the deleted tokens by density peaks with k neighbours (Eq. 8-9), cosine assignment, one
    token per cluster (Eq. 10: a sum; App. C: a weighted sum), going on into the later layers.

    Here: stages after LLM layers `layers` (default (2, 6, 15) for a 32-layer LLM, scaled to L/32 and made
    strictly increasing otherwise: (0, 1, 2) of 4). The attention module of such a layer gives, recomputed
    from its own q/k projections (any attention backend), the head-mean softmax rows of the instruction's
    text tokens (the row's text after its last image; the last prompt token if there is none) over all real
    keys of their causal rows. `raters="embeddings"` (default): per image, once, on the LLM input (after
    any pre-LLM stage), r_t = mean over the image's visual tokens of softmax over the instruction tokens
    of <h_v, h_t> ("input_text_relevance"); `rater_rule="above"` (default, the code): r_t > mean(r);
    "at_least": r_t >= mean(r) (the paper's Eq. 5); all instruction tokens where none qualifies.
    `raters="attention"` (tokprune's variant) re-chooses them at each stage: the text tokens whose attention
    to the image's present tokens passes the same rule. Score = the raters' mean attention (Eq. 3).

    Counts: `budget` / `keep_ratio` = f, the last stage's top-k count of an image of n tokens (default
    110/576, the code's "192"). Each stage's top-k fraction is interpolated piecewise-linearly in f/n
    through (0, 0, 0), the three published schedules (as fractions of 576) and (1, 1, 1), then ceil(fraction
    * n): budgets 17/36/110 of 576 give the code's counts exactly; e.g. 64 of 576 gives 302/145/64.
    `recycle` selects the recycling:
      * "code" (default): as the v1.5 code, at every stage, on top of the stage's top-k count k (so an
        image ends with f + c_3 tokens, 113 for "192"): `stage_counts` gives k + c (`code_split` recovers
        k from it), `code_recycle_select` makes the cluster tokens; `recycle_ratio` (0.3) and `cluster_size`
        (10) are the code's 0.3 and 10;
      * "within": tokprune's earlier reading of §3.3 inside the budget (`recycle_select`): ceil(ratio * N)
        recycled into min(r // cluster_size + 1, r, k) tokens that take c of the k slots, density peaks as
        Eq. 8-9 with the 5 nearest other tokens, unscaled distances, cosine assignment, the plain mean;
      * "off": pure top-k (the counts above; f exactly).
    `recycle_ratio` / `cluster_size` act only with recycling: another value with recycle="off" is an error.

    Deliberate differences from the v1.5 code (default options):
    (1) positions and order: a cluster token sits in its centre's slot (a dropped token's), and every kept
        token keeps its original position; the code appends the cluster tokens after the kept visual ones
        and renumbers the sequence 0, 1, ... after each stage. The Selection's `order` and `extra` carry
        the code's layout, which the engine does not apply inside the LLM yet; so the first stage agrees
        with the code exactly and the later ones score a sequence of other positions;
    (2) ties: equal scores go to the lower index (torch.topk's order is unspecified), equal densities to the
        better-scored recycled token (the code adds 1e-6 uniform noise, so it is not deterministic);
    (3) raters per image from the row's text after its last image (the code handles one image per prompt,
        batch 1, its text = every token after the image); where no text token is above the mean (all
        equal), all rate (the code would average over no rater);
    (4) float32 scoring and clustering (the code runs in float16);
    (5) budgets other than the three published ones use the interpolated schedule (the code has only
        those three; its README's 96 is not in score.py), on any LLM depth (the layers scaled);
    (6) the v1 code's and the paper's rank-adaptive counts (Eq. 7) are not offered: an in-LLM stage's count
        is fixed before it scores.
    """

    name = "sparsevlm"
    code_families = ("llava",)
    code_positions = "contiguous"
    family = "text-guided, progressive"
    default_budget = Budget(ratio=110 / 576)
    paper = "Zhang et al., ICML 2025 (SparseVLM)"
    layers: tuple[int, ...] | None = None
    raters: str = "embeddings"
    rater_rule: str = "above"
    recycle: str = "code"
    recycle_ratio: float = RECYCLE_DEFAULTS["recycle_ratio"]
    cluster_size: int = RECYCLE_DEFAULTS["cluster_size"]

    def __post_init__(self) -> None:
        check_int_tuple(self, "layers", len(PUBLISHED_LAYERS))
        check_choice(self, "raters", _RATERS)
        check_choice(self, "rater_rule", RATER_RULES)
        check_choice(self, "recycle", RECYCLE)
        check_number(self, "recycle_ratio", 0, 1, low_open=True)
        check_int(self, "cluster_size", 1)
        check_only_with(
            self,
            RECYCLE_DEFAULTS,
            self.recycle != "off",
            "recycle='code' or 'within'",
            "to size the clusters",
        )

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

    def topk_counts(self, n: int, budget: Budget) -> list[int]:
        """The top-k count of each stage for an image of n tokens: the interpolated schedule, last = f."""
        final = budget.kept(n)
        if final >= n:
            return [n] * len(PUBLISHED_LAYERS)
        fractions = schedule_fractions(Fraction(final, n))
        return [min(n, max(final, math.ceil(f * n))) for f in fractions[:-1]] + [final]

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        """Tokens of the image after each stage: the top-k counts, plus the code's clusters under "code"
        (a stage of k < n_before keeps k + c(n_before - k); one with nothing to drop keeps them all).
        `select` recovers k with `code_split`: on the rare totals two k share (never on the published
        schedules; k + 1 and one cluster fewer), the larger k."""
        counts = self.topk_counts(n, budget)
        if self.recycle != "code":
            return counts
        totals, current = [], n
        for k in counts:
            if k < current:
                current = k + code_recycled(current - k, self.recycle_ratio, self.cluster_size)[1]
            totals.append(current)
        return totals

    def scores(self, image: ImageTokens) -> torch.Tensor:
        """(n,) rater scores of one image's tokens.

        image.signals["text_query_attention"]: (n, T), column t = attention of the row's t-th instruction
        token; image.text["text_query_attention"]: (m, T), one row per instruction token, so columns >= m
        are padding (m = 0: column 0 holds the row's last token, the only rater). With raters="embeddings",
        image.signals["input_text_relevance"]: (n, T), every row the image's relevance r (Eq. 4) of the
        instruction tokens, from the LLM input; raters by `rater_rule` on r over the m columns.
        """
        attention = image.signals[SIGNAL]
        text = image.text.get(SIGNAL)
        m = max(text.shape[0] if text is not None else attention.shape[1], 1)
        strict = self.rater_rule == "above"
        raters = None
        if self.raters == "embeddings":
            raters = mean_or_above(image.signals[RELEVANCE][0, :m].float(), strict)
        return rater_scores(attention[:, :m].T, raters, strict)

    def select(self, image: ImageTokens, k: int) -> Selection:
        scores = self.scores(image)
        if self.recycle == "code":
            return code_recycle_select(image.embeds, scores, k, self.recycle_ratio, self.cluster_size)
        if self.recycle == "off":
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
