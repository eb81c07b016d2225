"""DivPrune: diversity-based visual token pruning as a max-min diversity problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection


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
    selection is the greedy max-min diversity subset. Default: retained ratio 0.098 (57 of 576 tokens on
    LLaVA-1.5: tokprune rounds keep_ratio up everywhere; the reference rounds to 56). Kept tokens stay in their original order and positions (the public code's sorting choice,
    made explicit here).
    """

    name = "divprune"
    family = "diversity"
    default_budget = Budget(ratio=0.098)
    paper = "Alvar et al., CVPR 2025 (DivPrune)"

    def select(self, image: ImageTokens, k: int) -> Selection:
        return Selection(keep=max_min_diverse(image.embeds, k))
