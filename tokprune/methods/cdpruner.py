"""CDPruner: instruction-conditioned diversity by greedy MAP inference of a conditional DPP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection
from tokprune.methods.options import check_bool, check_number


def instruction_relevance(
    visual: torch.Tensor, text: torch.Tensor, negate: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Relevance r in (0, 1] of every visual token to the instruction, in float32.

    visual: (n, D), text: (m, D), m >= 1. s_i = mean_j cos(visual_i, text_j) (negated if `negate`), then
    min-max normalised over the image's tokens: r_i = (s_i - min s + eps) / (max s - min s + eps). The most
    relevant token gets exactly 1, the least eps / (range + eps) > 0, and a constant s gives r = 1 everywhere.
    """
    v = F.normalize(visual.float(), dim=-1)
    t = F.normalize(text.float().to(v.device), dim=-1)
    s = (v @ t.T).mean(dim=1)  # (n,)
    if negate:
        s = -s
    low, high = s.min(), s.max()
    return (s - low + eps) / (high - low + eps)


GRAM_LIMIT = 8192  # tokens up to which the n x n similarity matrix is precomputed (256 MiB in float32)


def greedy_dpp_map(
    features: torch.Tensor, quality: torch.Tensor, k: int, rank_tol: float = 1e-6
) -> torch.Tensor:
    """Greedy MAP of the DPP with kernel L = diag(q) · S · diag(q), S = cosine similarity of `features`.

    Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process", NeurIPS 2018: each
    step adds the token j maximising det(L_{Y ∪ {j}}) = det(L_Y) · d_j², where d_j² is j's residual
    after projecting out the chosen tokens; the residuals and the rows of the incremental Cholesky factor
    are updated for all n candidates at once. Up to `GRAM_LIMIT` tokens the cosine matrix S is formed once
    (one n×n GEMM, then O(n·k) per step, O(n²) memory); beyond it rows of L are formed on the fly from the
    features (O(n·(D + k)) per step, memory O(n·(D + k)), never n×n).

    Out of numerical rank: once the largest remaining residual is <= rank_tol · max_i L_ii (the DPP cannot
    grow without a singular kernel, e.g. D < k or duplicate tokens), every remaining step takes the
    untaken token with the largest quality (ties towards the lower index). This is decided on the device,
    without a host synchronisation per step.

    features: (n, D); quality: (n,) non-negative; 1 <= k <= n. Computed in float32.
    Returns (k,) LongTensor of distinct indices in selection order.
    """
    x = F.normalize(features.float(), dim=-1)
    q = quality.float().to(x.device)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    # diag(L) exactly: S_ii = 1 (0 for an all-zero feature), so equal qualities tie towards the lower index
    residual = q.square() * (x.abs().amax(dim=-1) > 0)
    tol = (rank_tol * residual.max()).clamp_min(1e-30)
    gram = x @ x.T if n <= GRAM_LIMIT else None  # S, when it fits
    factor = x.new_zeros(k, n)  # rows of the incremental Cholesky factor, one per chosen token
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    in_rank = torch.ones((), dtype=torch.bool, device=x.device)
    for step in range(k):
        open_residual = residual.masked_fill(taken, float("-inf"))
        j_dpp = open_residual.argmax()
        best = open_residual[j_dpp]
        in_rank = in_rank & (best > tol)
        j_rel = q.masked_fill(taken, float("-inf")).argmax()
        j = torch.where(in_rank, j_dpp, j_rel)
        row = q[j] * q * (gram[j] if gram is not None else x @ x[j])  # L[j, :]
        e = (row - factor[:step, j] @ factor[:step]) / best.clamp_min(tol).sqrt()
        e = torch.where(in_rank, e, torch.zeros_like(e))  # out of rank: factor and residuals unchanged
        factor[step] = e
        residual = residual - e.square()
        taken[j] = True
        chosen[step] = j
    return chosen


@dataclass
class CDPruner(Method):
    """CDPruner — Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
    Pruning in MLLMs", arXiv:2506.10967 (2025).

    Per image (per frame), with x_i = the projected visual embeddings (`image.embeds`, the LLM's input) and
    t_j = the instruction's LLM input embeddings (`image.text["embeds"]`):

    * similarity S_ij = cos(x_i, x_j);
    * relevance s_i = mean_j cos(x_i, t_j), min-max normalised over the image's tokens:
      r_i = (s_i - min s + 1e-6) / (max s - min s + 1e-6) in (0, 1];
    * quality q = r (theta=None, the paper's kernel and the authors' LLaVA code), or, with theta in [0, 1),
      q = exp(alpha · r), alpha = theta / (2 (1 - theta)) — Chen et al.'s relevance/diversity trade-off,
      which the authors' code offers as an optional knob (0.5 in their examples): then
      log det L_Y = theta/(1-theta) · Σ_Y r + log det S_Y;
    * conditional DPP kernel L = diag(q) · S · diag(q); greedy MAP inference (`greedy_dpp_map`) picks the
      k tokens; kept tokens stay in their original order and positions.

    Budget: k tokens per image (per frame for video), the engine's `budget`/`keep_ratio`; default 128 of
    576 on LLaVA-1.5, one of the paper's main settings (it also reports 64 and 32).

    Without an instruction (no "embeds" in `image.text`, or an empty one) relevance is uniform and this is
    the plain DPP over S. If the DPP runs out of numerical rank before k tokens (fewer feature dimensions
    than k, duplicate tokens), the remaining tokens are the most relevant untaken ones.

    Deliberate differences: (1) S is computed from the projected embeddings and relevance against the
    instruction's LLM input embeddings, both in the LLM's input space (the authors' LLaVA code takes S
    from the vision tower's features and relevance from CLIP image/text embeddings), so one signal-free
    pre-LLM step serves every model; (2) the authors' public code negates the mean similarity before
    normalising, which they describe as an empirical observation on LLaVA's CLIP space (their issues #9,
    #14); the default follows the paper's description (more similar = more relevant) and
    `negate_relevance=True` reproduces the code; (3) the rank fallback above is ours (the public code
    keeps dividing by a vanishing residual).
    """

    name = "cdpruner"
    where = "pre"
    signals = ("instruction",)
    default_budget = Budget(tokens=128)
    paper = "Zhang et al., arXiv:2506.10967 (CDPruner)"
    theta: float | None = None
    negate_relevance: bool = False
    rank_tol: float = 1e-6

    def __post_init__(self) -> None:
        check_number(self, "theta", 0, 1, high_open=True, optional=True)
        check_bool(self, "negate_relevance")
        check_number(self, "rank_tol", 0, 1, low_open=True, high_open=True)

    def quality(self, image: ImageTokens) -> torch.Tensor:
        """Per-token quality q (n,) of the conditional kernel, float32 (uniform without an instruction)."""
        text = image.text.get("embeds")
        if text is None or text.numel() == 0:
            return torch.ones(image.n, dtype=torch.float32, device=image.embeds.device)
        relevance = instruction_relevance(image.embeds, text, negate=self.negate_relevance)
        if self.theta is None:
            return relevance
        alpha = self.theta / (2.0 * (1.0 - self.theta))
        return torch.exp(alpha * relevance)

    def select(self, image: ImageTokens, k: int) -> Selection:
        chosen = greedy_dpp_map(image.embeds, self.quality(image), k, rank_tol=self.rank_tol)
        return Selection(keep=chosen.sort().values)
