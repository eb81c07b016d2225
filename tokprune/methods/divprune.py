"""DivPrune: diversity-based visual token pruning as a max-min diversity problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection


@dataclass(frozen=True)
class RoundedRatio(Budget):
    """A keep ratio rounded to the nearest count, as the DivPrune code counts its retained tokens
    (`int(round(ratio * n))`, Python's round: half to even; at least 1), instead of the engine's
    ceil(ratio * n). Only DivPrune's default budget: an explicit budget / keep_ratio replaces it."""

    def kept(self, n: int) -> int:
        return min(n, max(1, int(round(self.ratio * n))))

    def __str__(self) -> str:
        return f"keep_ratio={self.ratio:g} (rounded to nearest)"


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diversity (MMDP) subset of k rows under cosine distance 1 - cos(x_i, x_j).

    features: (n, d). First pick: the token farthest from its nearest neighbour; then repeatedly the
    token whose minimum distance to the chosen set is largest. Each of the k steps is one vectorised
    update over all n candidates (the greedy recurrence itself is sequential, as in the paper).
    Returns (k,) sorted LongTensor.
    """
    x = F.normalize(features.float(), dim=-1)
    distance = 1.0 - x @ x.T  # (n, n)
    n = distance.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=distance.device)
    first = distance.masked_fill(eye, float("inf")).amin(1).argmax()
    chosen = torch.empty(k, dtype=torch.long, device=distance.device)
    chosen[0] = first
    min_distance = distance[first].clone()
    taken = torch.zeros(n, dtype=torch.bool, device=distance.device)
    taken[first] = True
    for step in range(1, k):
        pick = min_distance.masked_fill(taken, float("-inf")).argmax()
        chosen[step] = pick
        taken[pick] = True
        min_distance = torch.minimum(min_distance, distance[pick])
    return chosen.sort().values


@dataclass
class DivPrune(Method):
    """DivPrune — Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
    Models", CVPR 2025.

    Features are the projected visual embeddings (the LLM's input); distance is 1 - cosine similarity;
    selection is the greedy max-min diversity subset. Default: retained ratio 0.098 (the authors'
    SUBSET_RATIO), counted as their code counts it, int(round(0.098 * n)) (`RoundedRatio`): 56 of 576
    tokens on LLaVA-1.5 (an explicit keep_ratio=0.098 follows the engine's rounding up: 57). Kept
    tokens stay in their original order and positions (the code sorts the kept positions).

    Code: github.com/vbdi/divprune (commit 799e2d950aa01ba7860907f5a6d86061f885dca6),
    LLaVA/llava/model/llava_arch.py `DivPrune`, called on the LLM input embeddings at the end of
    `prepare_inputs_labels_for_multimodal`. Agreement (tests/agreement/test_divprune.py): the kept set
    equals the re-implementation of that selection on the tiny LLaVA-1.5 (576 tokens).

    Remaining differences from the authors' code, kept on purpose:
    (1) chosen tokens are masked out of later picks (the code relies on their own ~0 distance in the
        minimum, which could, for exact duplicates, pick a token twice); the first pick takes each
        token's nearest *other* token (the code takes the second-smallest entry of its column, which is
        the same unless a token has an exact duplicate);
    (2) on LLaVA-NeXT the code runs on the whole image's placeholder rows, the image_newline rows
        included, and counts them in n; here the newlines are separators (never candidates, not
        counted), and the code's fixed 35-token system prompt offset is the placeholders' real place;
    (3) ties go to the lower index (torch.argmax is the same in practice).
    """

    name = "divprune"
    family = "diversity"
    default_budget = RoundedRatio(ratio=0.098)
    code_families = ("llava", "llava_next")
    paper = "Alvar et al., CVPR 2025 (DivPrune)"

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=max_min_diverse(image.embeds, k))
