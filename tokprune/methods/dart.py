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
    Matters More", EMNLP 2025.

    After layer `layer` - 1 (default K = 2): pivots are the `pivots` // 2 image tokens and `pivots` // 2
    instruction tokens (text after the image) with the largest L1 norm of that layer's keys (post-RoPE,
    heads concatenated); similarity is the cosine of the hidden states entering layer K after the final
    norm. The image pivots are kept; each pivot in turn keeps the not-yet-kept image tokens *least*
    similar to it, in equal shares. Default budget 128 tokens, 8 pivots.

    Deliberate difference: the kept count is exactly the budget (the reference keeps its image pivots on
    top of pivots x share, e.g. 132 for 128); shares differ by at most one token. Without instruction
    tokens all pivots are image tokens.
    """

    name = "dart"
    signals = ("keys", "hidden")
    default_budget = Budget(tokens=128)
    paper = "Wen et al., EMNLP 2025 (DART)"
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
