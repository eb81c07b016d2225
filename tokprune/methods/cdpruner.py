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

    visual: (n, D), text: (m, D), m >= 1. s_i = mean_j cos(visual_i, text_j) (negated if `negate`, as the
    authors' code does), then min-max normalised over the image's tokens:
    r_i = (s_i - min s + eps) / (max s - min s + eps). The most relevant token gets exactly 1, the least
    eps / (range + eps) > 0, and a constant s gives r = 1 everywhere. Since mean_j cos(v_i, t_j) =
    v_i/|v_i| · mean_j t_j/|t_j| and the min-max step removes a common positive scale, r is also the
    normalised cosine with the single pooled text vector mean_j t_j/|t_j|.
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
    Pruning in MLLMs", arXiv:2506.10967 (NeurIPS 2025).

    What the paper fixes (abstract, https://arxiv.org/abs/2506.10967, and the project page
    https://theia4869.com/CDPruner, sections "Instruction Relevance" and "Conditional DPP"): every visual
    token gets a relevance to the user instruction, the cosine similarity between the token and the
    instruction, and tokens more similar to the instruction count as more relevant; the pairwise similarity
    of the visual tokens is conditioned on (weighted by) the relevance of both tokens; the kept subset is
    the one a determinantal point process over this conditional kernel rates highest, found by the greedy
    MAP algorithm of Chen, Zhang & Zhou (NeurIPS 2018, "Fast Greedy MAP Inference for DPP"). Pruning happens
    once, before the LLM; kept tokens keep their order and positions.

    This implementation, per image as the engine calls it (x_i = the image's projected visual embeddings,
    `image.embeds`; t_j = the LLM input embeddings of the instruction, `image.text["embeds"]`, i.e. the
    row's text after its images):

    * similarity S_ij = cos(x_i, x_j);
    * relevance s_i = mean_j cos(x_i, t_j), min-max normalised over the image's tokens
      (`instruction_relevance`): r_i = (s_i - min s + 1e-6) / (max s - min s + 1e-6), in (0, 1], with
      r = 1 for the most relevant token;
    * quality q = r (theta=None), or q = exp(alpha · r) with alpha = theta / (2 (1 - theta)) for theta in
      [0, 1), Chen et al.'s relevance/diversity trade-off, under which log det L_Y = theta/(1-theta) · Σ_Y r
      + log det S_Y;
    * conditional kernel L = diag(q) · S · diag(q); `greedy_dpp_map` adds, k times, the token that
      multiplies det(L_Y) the most.

    Details taken from the authors' LLaVA code (github.com/Theia-4869/CDPruner, `encode_images` in
    llava/model/llava_arch.py and llava/model/multimodal_encoder/clip_encoder.py), not from the paper text:
    S is computed from the projector's output (the LLM input embeddings), as here; relevance compares the
    CLIP patch features passed through CLIP's post-layernorm and visual projection with the CLIP text
    embeddings of the instruction string (one per 77-token chunk), averaged over the chunks, *negated*, then
    min-max normalised with 1e-6 added to the numerator only; the kernel uses q = r (the theta = 0.5
    reweighting is present but commented out); the greedy loop has no stopping rule and always picks the
    requested count; on LLaVA-NeXT each crop (base view and every tile) gets its own DPP with the same count
    (their README's "32 × 5 = 320"), relevance being normalised over all crops together.

    Deliberate differences from that code:
    (1) relevance is measured in the LLM's input space (projected visual embeddings against the
        instruction's token embeddings), because most supported models have no CLIP text tower; a mean of
        cosines over the instruction tokens equals, after the min-max step, the cosine with the mean of the
        unit-normalised token embeddings (the common scale cancels), i.e. relevance to one pooled
        instruction vector, the nearest analogue of CLIP's single sentence embedding;
    (2) no negation by default: the paper describes keeping the instruction-relevant tokens, while the
        code negates the mean similarity, which the authors call an empirical observation on LLaVA's CLIP
        space (their issues #9, #14, #19, #22); `negate_relevance=True` reproduces the code;
    (3) 1e-6 is added to the denominator as well, so a constant s gives r = 1 everywhere instead of a
        division by zero, and the normalisation is per image;
    (4) the engine's budget is per image and the DPP ranks all tokens of an image together: an AnyRes
        image (base view + tiles) or a video (frames) is one DPP with one budget, not one DPP per crop or
        frame with equal counts;
    (5) if the DPP runs out of numerical rank before k tokens (fewer feature dimensions than k, duplicate
        tokens) the remaining picks are the most relevant untaken tokens, so exactly k tokens come back
        (Chen et al.'s algorithm stops once the best residual falls below a tolerance; the authors' code
        keeps dividing by the vanishing residual).

    Without an instruction (no "embeds" in `image.text`, or an empty one) relevance is uniform and this is
    the plain DPP over S.

    Budget: `default_budget` is 128 tokens per image of LLaVA-1.5's 576, a setting the authors' README runs
    (with 64); the engine's `budget`/`keep_ratio` override it.
    """

    name = "cdpruner"
    family = "diversity + relevance"
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
