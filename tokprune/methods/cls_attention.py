"""[CLS]-attention methods: FasterVLM and VisionZip.

On ViTs without a [CLS] token (Qwen, SigLIP) the adapter's "cls_attention" signal is the attention each
token *receives* at the same layer, pooled over the patches merged into one LLM token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection, topk_sorted
from tokprune.methods.options import check_number


@dataclass
class FasterVLM(Method):
    """FasterVLM — Zhang et al., "[CLS] Attention is All You Need for Training-Free Visual Token Pruning:
    Make VLM Inference Faster", arXiv:2412.01818 (2024).

    Score = head-mean [CLS] attention row at the penultimate ViT layer (the layer whose output feeds the
    projector); keep the top-k tokens in their original order. Default: 75% reduction (keep_ratio 0.25),
    one of the paper's main settings.
    """

    name = "fastervlm"
    family = "[CLS] attention"
    signals = ("cls_attention",)
    default_budget = Budget(ratio=0.25)
    paper = "Zhang et al., arXiv:2412.01818 (FasterVLM)"

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=topk_sorted(image.signals["cls_attention"], k))


@dataclass
class VisionZip(Method):
    """VisionZip — Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025.

    * dominant tokens: the top (k - c) tokens by [CLS] attention at ViT layer -2 (head mean);
    * contextual tokens: c = round(k * contextual_ratio) targets uniformly spaced (step
      max(1, n_rest // c)) over the remaining tokens in order; every other remaining token joins the
      target whose head-mean key (layer -2, L2-normalised) is most similar; a target's embedding becomes
      the mean of itself and the tokens it absorbed.
    Published split: 64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30 (contextual_ratio = 10/64); default 64.

    Deliberate differences: (1) the merge averages the LLM input embeddings (after the projector) rather
    than CLIP features before it, so that pruning is one step of the engine; (2) LLaVA's HF models drop the
    [CLS] feature before the LLM, so all k tokens come from the patches (the original keeps [CLS] as one of
    the dominant tokens); (3) merged tokens stay at their target's original position instead of being
    appended after the dominant ones, so positions keep their spatial meaning.
    """

    name = "visionzip"
    family = "[CLS] attention + merge"
    signals = ("cls_attention", "vit_keys")
    default_budget = Budget(tokens=64)
    paper = "Yang et al., CVPR 2025 (VisionZip)"
    contextual_ratio: float = 10 / 64

    def __post_init__(self) -> None:
        check_number(self, "contextual_ratio", 0, 1, high_open=True)

    def select(self, image: ImageTokens, k: int) -> Selection:
        n_context = min(round(k * self.contextual_ratio), k - 1) if k > 1 else 0
        return dominant_contextual(
            image.embeds, image.signals["cls_attention"], image.signals["vit_keys"], k, n_context
        )


def dominant_contextual(
    embeds: torch.Tensor, scores: torch.Tensor, metric: torch.Tensor, k: int, n_context: int
) -> Selection:
    """VisionZip's rule: k - n_context dominant tokens by `scores`, n_context merged contextual tokens.

    embeds: (n, D); scores: (n,) importance; metric: (n, d) features whose cosine similarity assigns the
    merged tokens. Contextual targets: n_context tokens uniformly spaced (step max(1, n_rest // n_context))
    over the remaining tokens in order; every other remaining token joins its most similar target (ties:
    the first); a target's embedding becomes the mean of itself and the tokens it absorbed (float32, cast
    back to embeds' dtype). Returns the k kept indices, sorted, with their embeddings.
    """
    dominant = topk_sorted(scores, k - n_context)
    if n_context == 0:
        return Selection(keep=dominant)
    rest = torch.ones(embeds.shape[0], dtype=torch.bool, device=dominant.device)
    rest[dominant] = False
    rest = rest.nonzero().squeeze(1)  # remaining tokens, in order
    step = max(1, rest.numel() // n_context)
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[torch.arange(0, rest.numel(), step, device=rest.device)[:n_context]] = True
    targets, others = rest[is_target], rest[~is_target]
    keys = F.normalize(metric.float(), dim=-1)
    owner = (keys[others] @ keys[targets].T).argmax(1)  # most similar target of every other token
    values = embeds.float()
    sums = values[targets].index_add(0, owner, values[others])
    sizes = torch.ones(targets.numel(), device=rest.device).index_add(
        0, owner, torch.ones_like(owner, dtype=torch.float)
    )
    keep, order = torch.cat([dominant, targets]).sort()
    merged = torch.cat([values[dominant], sums / sizes[:, None]])[order]
    return Selection(keep=keep, merged=merged.to(embeds.dtype))
