"""ToMe as a pre-LLM merging method: repeated bipartite soft matching down to exactly the budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection


def bipartite_merge(
    metric: torch.Tensor, embeds: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge n tokens down to exactly k (1 <= k < n) by repeated bipartite soft matching.

    metric: (n, d) features whose cosine similarity decides the matches (ToMe: the attention keys);
    embeds: (n, D) the features that are averaged.
    Returns (keep (k,) sorted original indices of the survivors, merged (k, D) float32 size-weighted means
    in the order of `keep`, group (n,) the original index of the survivor every token ended up in).

    One round on the current tokens (always kept in original order): A = tokens 0, 2, 4, ..., B = tokens
    1, 3, 5, ...; every A token picks its most cosine-similar B token (ties: lowest B); the r A tokens
    with the highest similarity (ties: lowest A) are merged into their partners, r = min(current - k, |A|).
    A merged token's embedding and metric are the size-weighted means of its members (kept as sums and
    sizes), so its embedding is exactly the plain mean of the original tokens in its group.
    """
    n = metric.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"bipartite_merge needs 1 <= k < n, got k={k}, n={n}")
    device = embeds.device
    metric_sum = metric.to(device=device, dtype=torch.float32).clone()
    embed_sum = embeds.float().clone()
    size = torch.ones(n, device=device)
    index = torch.arange(n, device=device)  # original index of every current token (ascending)
    group = torch.arange(n, device=device)
    while index.numel() > k:
        current = index.numel()
        a = torch.arange(0, current, 2, device=device)
        b = torch.arange(1, current, 2, device=device)
        # normalising a sum gives the direction of the size-weighted mean
        unit = F.normalize(metric_sum, dim=-1)
        similarity = unit[a] @ unit[b].T  # (|A|, |B|)
        partner = similarity.argmax(-1)  # first maximum = lowest B index on ties
        best = similarity.gather(1, partner[:, None])[:, 0]
        r = min(current - k, a.numel())
        order = torch.sort(best, descending=True, stable=True).indices
        src, dst = a[order[:r]], b[partner[order[:r]]]
        embed_sum.index_add_(0, dst, embed_sum[src])
        metric_sum.index_add_(0, dst, metric_sum[src])
        size.index_add_(0, dst, size[src])
        remap = torch.arange(n, device=device)
        remap[index[src]] = index[dst]
        group = remap[group]
        survivors = torch.ones(current, dtype=torch.bool, device=device)
        survivors[src] = False
        index, embed_sum, metric_sum, size = (
            index[survivors],
            embed_sum[survivors],
            metric_sum[survivors],
            size[survivors],
        )
    return index, embed_sum / size[:, None], group


@dataclass
class ToMe(Method):
    """ToMe — Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023; here applied once, to the
    visual tokens entering the LLM ("pre"), as the VLM pruning papers evaluate it.

    Rule: repeated bipartite soft matching (see `bipartite_merge`) until exactly k tokens remain. The
    similarity is the cosine of the ViT keys ("vit_keys": head-mean keys of the layer feeding the
    projector, LLaVA: CLIP layer -2; Qwen: pooled over each 2x2 merge unit), as in ToMe; without that
    signal, of the token embeddings. Merged embeddings and keys are size-weighted averages. Each survivor
    keeps the position of its own original token (the B token that absorbed others keeps its index).
    Schedule: r per round = min(tokens still to remove, |A|), |A| = ceil(current / 2), so 576 -> 64 runs
    288, 144, 72, 8 merges (576 -> 288 -> 144 -> 72 -> 64). When every round is full (r = |A|, e.g. 196 -> 98
    -> 49) all A tokens merge and the survivors are the same positions (every 2^rounds-th token) whatever the
    image; only a partial last round makes the kept positions depend on the input.

    Default budget: 64 tokens per image, the setting in which the VLM papers report ToMe on LLaVA-1.5
    (DESIGN §7: 70.1 at 64 of 576, HoloV Table 1).

    Deliberate differences from ToMe in the ViT: (1) all merging happens in one place, on the LLM input
    embeddings (after the projector), so r is chosen per round to land exactly on k instead of a fixed r
    per ViT layer; (2) a merged token's key is the size-weighted mean of its members' keys (ToMe
    recomputes keys in the next layer; we have no next layer); (3) proportional attention does not apply
    (the LLM sees each merged token once); (4) after each round the survivors are put back in their
    original (raster) order before the next A/B alternation, where ToMe concatenates [unmerged A, B].
    """

    name = "tome"
    family = "merging"
    signals = ("vit_keys",)
    default_budget = Budget(tokens=64)
    paper = "Bolya et al., ICLR 2023 (ToMe)"

    def select(self, image: ImageTokens, k: int) -> Selection:
        n = image.n
        device = image.embeds.device
        if k >= n or k <= 0:
            return Selection(keep=torch.arange(max(0, min(k, n)), device=device))
        metric = image.signals.get("vit_keys", image.embeds)
        keep, merged, _ = bipartite_merge(metric, image.embeds, k)
        return Selection(keep=keep, merged=merged.to(image.embeds.dtype))
