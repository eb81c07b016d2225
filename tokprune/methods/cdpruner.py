"""CDPruner: instruction-conditioned diversity by greedy MAP inference of a conditional DPP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget, split_budget
from tokprune.methods.base import ImageTokens, Method, Selection
from tokprune.methods.options import check_bool, check_choice, check_number

_UNITS = ("per_unit", "joint")


def instruction_relevance(
    visual: torch.Tensor, text: torch.Tensor, negate: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Relevance r in (0, 1] of every visual token to the instruction, in float32.

    visual: (n, D), text: (m, D), m >= 1. s_i = mean_j cos(visual_i, text_j), negated if `negate` (the
    default, as the authors' code does), then min-max normalised over the image's tokens:
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
    * relevance s_i = -mean_j cos(x_i, t_j) (negated, as the authors' code does; negate_relevance=False
      for the paper's sign), min-max normalised over the image's tokens (`instruction_relevance`):
      r_i = (s_i - min s + 1e-6) / (max s - min s + 1e-6), in (0, 1];
    * quality q = r (theta=None), or q = exp(alpha · r) with alpha = theta / (2 (1 - theta)) for theta in
      [0, 1), Chen et al.'s relevance/diversity trade-off, under which log det L_Y = theta/(1-theta) · Σ_Y r
      + log det S_Y;
    * conditional kernel L = diag(q) · S · diag(q); `greedy_dpp_map` adds, k times, the token that
      multiplies det(L_Y) the most;
    * units="per_unit" (default): on an image of several units (LLaVA-NeXT's base view and tiles, video
      frames) every unit runs its own DPP over its own tokens, with the image's k split over the units
      by size (`split_budget`: equal counts for equal tiles, the code's "32 × 5") and relevance
      normalised once over all the image's tokens, as the authors' LLaVA-NeXT path does;
      units="joint" runs one DPP over all the image's tokens with one budget.

    Details taken from the authors' LLaVA code (github.com/Theia-4869/CDPruner, commit
    9541616c40fcd5625de1cdb8ea6c33c129eb7864: `encode_images` in llava/model/llava_arch.py and
    `CLIPVisionTower.forward` in llava/model/multimodal_encoder/clip_encoder.py), not from the paper text:
    S is computed from the projector's output (the LLM input embeddings), as here; relevance compares the
    CLIP patch features (the feature layer, [CLS] dropped) passed through CLIP's post-layernorm and visual
    projection with the CLIP text embeddings (`CLIPTextModelWithProjection`) of the question string (the
    benchmark's question with the answer-format suffix removed, cut into 77-token chunks), averaged over
    the chunks, *negated* (the authors call this an empirical observation on LLaVA's CLIP space, their
    issues #9, #14, #19, #22), then min-max normalised with 1e-6 added to the numerator only; the kernel
    uses q = r (the theta = 0.5 reweighting is present but commented out); the greedy loop has no stopping
    rule and always picks the requested count; on LLaVA-NeXT (mm_patch_merge_type reduced to "spatial":
    no unpadding, no image_newline) every crop, base view and tiles, gets its own DPP with the same count
    (their README's "32 × 5"), relevance being min-max normalised over all crops together.

    Options that select variants: negate_relevance=True (default, the code) | False (the paper's sign,
    this library's former default); units="per_unit" (default, the code's LLaVA-NeXT path) | "joint";
    theta (None = the code's q = r).

    Agreement (tests/agreement/test_cdpruner.py): with the relevance taken from the same embeddings (see
    (1)), the kept set equals the re-implementation of the authors' selection on the tiny LLaVA-1.5 and on
    LLaVA-NeXT (base view + 2 x 2 tiles).

    Remaining differences from that code, kept on purpose:
    (1) relevance is measured in the LLM's input space (projected visual embeddings against the
        instruction's token embeddings: the row's text after its images, the chat template's tail
        included), because the Hugging Face checkpoints ship no CLIP text tower (nor, for most supported
        models, any text encoder aligned with the ViT); a mean of cosines over the instruction tokens
        equals, after the min-max step, the cosine with the mean of the unit-normalised token embeddings
        (the common scale cancels), i.e. relevance to one pooled instruction vector, the nearest
        analogue of CLIP's single sentence embedding. This is the one difference that changes kept sets
        on real checkpoints;
    (2) 1e-6 is added to the denominator as well, so a constant s gives r = 1 everywhere instead of a
        division by zero; otherwise r differs from the code's by a constant factor, which scales L by a
        constant and leaves every greedy choice unchanged (theta != None is the exception: exp(alpha r)
        is not scale-free, but the code has no theta);
    (3) the normalisation is per image (the code's min / max run over every image and crop of the
        batch; the same for one image per prompt);
    (4) on LLaVA-NeXT the Hugging Face model unpads the tile mosaic: the DPPs run on the tiles' remaining
        tokens with the budget split by their sizes, where the code selects its fixed count on the padded
        crops (the same when unpadding removes nothing, an image of the pinpoint's aspect ratio);
        per_unit also applies to video frames, which the code has no path for;
    (5) if the DPP runs out of numerical rank before k tokens (fewer feature dimensions than k, duplicate
        tokens) the remaining picks are the most relevant untaken tokens, so exactly k tokens come back
        (Chen et al.'s algorithm stops once the best residual falls below a tolerance; the authors' code
        keeps dividing by the vanishing residual); ties go to the lower index (the code's argmax is
        the same on CUDA in practice, but unspecified).

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
    code_families = ("llava", "llava_next")
    theta: float | None = None
    negate_relevance: bool = True
    units: str = "per_unit"
    rank_tol: float = 1e-6

    def __post_init__(self) -> None:
        check_number(self, "theta", 0, 1, high_open=True, optional=True)
        check_bool(self, "negate_relevance")
        check_choice(self, "units", _UNITS)
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
        quality = self.quality(image)
        units = image.units
        if self.units == "joint" or not units or len(units) < 2 or k >= image.n:
            chosen = greedy_dpp_map(image.embeds, quality, k, rank_tol=self.rank_tol)
            return Selection(keep=chosen.sort().values)
        return Selection(keep=self._per_unit(image, quality, k))

    def _per_unit(self, image: ImageTokens, quality: torch.Tensor, k: int) -> torch.Tensor:
        """One DPP per unit over its own tokens, k split by unit size; quality from the whole image."""
        kept = []
        for unit, k_unit in zip(image.units, split_budget(k, [u.index.numel() for u in image.units])):
            index = unit.index.to(image.embeds.device)
            if k_unit > 0:
                chosen = greedy_dpp_map(image.embeds[index], quality[index], k_unit, rank_tol=self.rank_tol)
                kept.append(index[chosen])
        return torch.cat(kept).sort().values
