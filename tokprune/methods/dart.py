"""DART: pruning by token duplication inside the LLM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, LLMMethod, Selection
from tokprune.methods.options import check_int, check_llm_layer


@dataclass
class DART(LLMMethod):
    """DART — Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
    Matters More", EMNLP 2025, arXiv:2502.11494.

    What the paper fixes (abstract, https://arxiv.org/abs/2502.11494, html v1/v2): tokens are pruned by
    their duplication with other tokens rather than by an importance score; a small set of pivot tokens is
    chosen and the visual tokens least duplicated by (least similar to) the pivots are kept, inside the LLM,
    without attention maps, so it works with fused attention kernels. The abstract gives no layer, pivot
    count or pivot criterion; the values below come from the authors' code (third-party ports such as
    NVIDIA TensorRT-Edge-LLM's DART pruner also describe the paper as pruning at decoder layer 2).

    Selection here, at the boundary `layer` = K (layers < K see every token, layers >= K the kept ones):

    * pivots: the `pivots` - `pivots` // 2 image tokens and the `pivots` // 2 instruction tokens (the
      row's text after its images) with the largest L1 norm of layer K-1's keys (post-RoPE, heads
      concatenated); default 8 = 4 + 4;
    * duplication: the cosine similarity of the hidden states entering layer K, taken after the model's
      final norm;
    * the image pivots are kept (text pivots are never kept: only visual tokens are pruned); then each
      pivot in turn, image pivots by descending key norm and then text pivots by descending key norm,
      keeps the not-yet-kept image tokens least similar to it; the k' = k - (image pivots) remaining
      slots are shared equally among all P pivots, the first k' mod P pivots taking one more.

    Details taken from the authors' code (github.com/ZichenWen1/DART, `get_retained_image_token`; the same
    routine is in ModelTC/LightCompress, the llmc token-reduction module "DART"), not from the paper text:
    K = 2 with pivot_image_token = pivot_text_token = 4 (their LLaVA-1.5 scripts); keys from layer K-1's
    KV cache, L1 norm; text pivots from every token after the image; similarity of the final-norm hidden
    states entering layer K; each pivot (image and text) takes floor(budget / P) tokens.

    Deliberate differences from that code:
    (1) the kept count is exactly the budget: the image pivots count towards it and the rest is shared
        with shares differing by at most one; the authors keep their image pivots on top of
        P · floor(budget / P), e.g. 4 + 8 · 16 = 132 for a budget of 128;
    (2) the pivots take their shares in the fixed order above; the authors iterate a Python set of
        positions, i.e. a hash order that their code does not choose deliberately;
    (3) with fewer than `pivots` // 2 instruction tokens the missing text pivots become image pivots (all
        pivots are image tokens without an instruction); with k below the number of image pivots only the
        k image tokens with the largest key norms are kept;
    (4) all visual tokens of an image are ranked together: an AnyRes image or a video is one selection
        with one budget (the authors' LLaVA code handles one image span).

    Default budget: 128 tokens per image (the authors' LLaVA-1.5 scripts: reduction ratio 0.778 of 576).
    """

    name = "dart"
    family = "duplication"
    signals = ("keys", "hidden")
    default_budget = Budget(tokens=128)
    paper = "Wen et al., EMNLP 2025, arXiv:2502.11494 (DART)"
    layer: int = 2
    pivots: int = 8

    def __post_init__(self) -> None:
        check_int(self, "layer", 1)
        check_int(self, "pivots", 1)

    def boundaries(self, num_layers: int) -> list[int]:
        check_llm_layer(self.layer, num_layers, "layer", self.name)
        return [self.layer]

    def select(self, image: ImageTokens, k: int) -> Selection:
        text_keys = image.text.get("keys")
        n_text = min(self.pivots // 2, 0 if text_keys is None else text_keys.shape[0])
        n_image = min(self.pivots - n_text, k)
        image_pivots = image.signals["keys"].float().abs().sum(-1).topk(n_image).indices
        hidden = F.normalize(image.signals["hidden"].float(), dim=-1)  # (n, D)
        pivot_hidden = [hidden[image_pivots]]
        if n_text:
            text_pivots = text_keys.float().abs().sum(-1).topk(n_text).indices
            pivot_hidden.append(F.normalize(image.text["hidden"][text_pivots].float(), dim=-1))
        pivot_hidden = torch.cat(pivot_hidden)  # (P, D)
        taken = torch.zeros(image.n, dtype=torch.bool, device=hidden.device)
        taken[image_pivots] = True
        remaining = k - n_image
        n_pivots = pivot_hidden.shape[0]
        similarity = pivot_hidden @ hidden.T  # (P, n)
        for p in range(n_pivots):
            share = remaining // n_pivots + (1 if p < remaining % n_pivots else 0)
            if share == 0:
                continue
            picks = similarity[p].masked_fill(taken, float("inf")).topk(share, largest=False).indices
            taken[picks] = True
        return Selection(keep=taken.nonzero().squeeze(1))
