"""ToMe as a pre-LLM merging method: repeated bipartite soft matching down to exactly the budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokprune.core.budget import Budget
from tokprune.methods.base import ImageTokens, Method, Selection
from tokprune.methods.options import check_choice

_ROUND_ORDERS = ("raster", "tome")


def bipartite_merge(
    metric: torch.Tensor, embeds: torch.Tensor, k: int, round_order: str = "raster"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge n tokens down to exactly k (1 <= k < n) by repeated bipartite soft matching.

    metric: (n, d) features whose cosine similarity decides the matches (ToMe: the attention keys);
    embeds: (n, D) the features that are averaged.
    Returns (keep (k,) sorted original indices of the survivors, merged (k, D) float32 size-weighted means
    in the order of `keep`, group (n,) the original index of the survivor every token ended up in,
    sequence (k,) the survivors' original indices in the order the last round leaves them).

    One round on the current t tokens, as ToMe's `bipartite_soft_matching` (facebookresearch/ToMe,
    tome/merge.py) does it: A = tokens 0, 2, 4, ... of the current sequence, B = tokens 1, 3, 5, ...; every
    A token picks its most cosine-similar B token (ties: lowest B); the r A tokens with the highest
    similarity (ties: lowest A) are merged into their partners, r = min(t - k, t // 2) (ToMe's cap
    r <= floor(t / 2) with no protected token: on an odd t one A token always stays). A merged token's
    embedding and metric are the size-weighted means of its members (kept as sums and sizes, ToMe's
    `merge_wavg`), so its embedding is exactly the plain mean of the original tokens in its group.
    The next round's sequence: round_order "raster" puts the survivors back in their original order;
    "tome" is ToMe's output order, [unmerged A tokens by descending similarity, then B in order].
    """
    n = metric.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"bipartite_merge needs 1 <= k < n, got k={k}, n={n}")
    device = embeds.device
    metric_sum = metric.to(device=device, dtype=torch.float32).clone()
    embed_sum = embeds.float().clone()
    size = torch.ones(n, device=device)
    index = torch.arange(n, device=device)  # original index of every current token, in sequence order
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
        r = min(current - k, current // 2)
        order = torch.sort(best, descending=True, stable=True).indices
        src, dst = a[order[:r]], b[partner[order[:r]]]
        embed_sum.index_add_(0, dst, embed_sum[src])
        metric_sum.index_add_(0, dst, metric_sum[src])
        size.index_add_(0, dst, size[src])
        remap = torch.arange(n, device=device)
        remap[index[src]] = index[dst]
        group = remap[group]
        survivors = torch.cat([a[order[r:]], b])  # ToMe's output order
        if round_order == "raster":
            survivors = survivors[torch.argsort(index[survivors])]
        index, embed_sum, metric_sum, size = (
            index[survivors],
            embed_sum[survivors],
            metric_sum[survivors],
            size[survivors],
        )
    ascending = torch.argsort(index)
    merged = (embed_sum / size[:, None])[ascending]
    return index[ascending], merged, group, index


@dataclass
class ToMe(Method):
    """ToMe — Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023; here applied once, to the
    visual tokens entering the LLM ("pre"), as the VLM pruning papers evaluate it.

    Rule: repeated bipartite soft matching (see `bipartite_merge`) until exactly k tokens remain. The
    similarity is the cosine of the ViT keys ("vit_keys": head-mean keys of the layer feeding the
    projector, LLaVA: CLIP layer -2; Qwen: pooled over each 2x2 merge unit), as in ToMe; without that
    signal, of the token embeddings. Merged embeddings and keys are size-weighted averages. Each survivor
    keeps the position of its own original token (the B token that absorbed others keeps its index).

    Schedule: r per round = min(tokens still to remove, floor(t / 2)) on t current tokens, ToMe's cap
    (`r = min(r, (t - protected) // 2)` in `bipartite_soft_matching`, protected = 0 since the LLM's
    visual tokens carry no [CLS]): 576 -> 64 runs 288, 144, 72, 8 merges (576 -> 288 -> 144 -> 72 -> 64),
    SigLIP's 729 -> 64 runs 364, 182, 91, 28 (729 -> 365 -> 183 -> 92 -> 64): on an odd t one A token
    (the least similar one) stays unmerged. When every round is full (r = t / 2 on even t, e.g. 196 ->
    98 -> 49) all A tokens merge and the survivors are the same positions (every 2^rounds-th token)
    whatever the image; only a partial round makes the kept positions depend on the input.

    Options: round_order="raster" (default) starts every round's A/B alternation on the survivors in their
    original (raster) order, this library's design; round_order="tome" carries ToMe's output order
    [unmerged A by descending similarity, B] into the next round, as stacked `bipartite_soft_matching`
    calls do (the two agree while no round leaves an A token unmerged before the last one, e.g. 576 ->
    64), and records that final sequence as `Selection.order`. ToMe has no released VLM code
    (`code_families` is empty), so the reproduction mode (`order="selection"`) is refused for it and the
    LLM gets the survivors in their original order either way.

    Default budget: 64 tokens per image, the setting in which the VLM papers report ToMe on LLaVA-1.5
    (DESIGN §7: 70.1 at 64 of 576, HoloV Table 1).

    What the official ToMe does (facebookresearch/ToMe, tome/merge.py `bipartite_soft_matching`,
    `merge_wavg`; tome/patch/timm.py `ToMeBlock`, `ToMeAttention`) and the LLaVA port of it in
    ModelTC/LightCompress (llmc/compression/token_reduction/tome.py: the same function between the
    attention and the MLP of every CLIP encoder layer, class_token=True), and this method does not:
    (1) it merges inside the ViT, a fixed r per layer (at most half the tokens each), not once on the LLM
        input embeddings down to exactly k; here r is chosen per round to land on k;
    (2) it protects the [CLS] token (class_token=True: A token 0 never merges and r <= (t - 1) // 2);
        here the LLM's visual tokens have no [CLS] (LLaVA's "default" strategy drops it, SigLIP has
        none), and where a [CLS] is among them (CLIP with strategy "full") it is merged like any token;
    (3) a merged token's key is recomputed by the next layer from the merged hidden state; here it is the
        size-weighted mean of its members' keys (there is no next layer);
    (4) proportional attention (log size added to the attention logits of later layers) does not apply:
        the LLM sees each merged token once, with no size;
    (5) under round_order="raster" (the default) the survivors go back to their raster order before the
        next round's A/B alternation, where stacked ToMe calls keep [unmerged A, B] (round_order="tome").
    """

    name = "tome"
    family = "merging"
    signals = ("vit_keys",)
    default_budget = Budget(tokens=64)
    paper = "Bolya et al., ICLR 2023 (ToMe)"

    round_order: str = "raster"

    def __post_init__(self) -> None:
        check_choice(self, "round_order", _ROUND_ORDERS)

    def select(self, image: ImageTokens, k: int) -> Selection:
        n = image.n
        device = image.embeds.device
        if k >= n or k <= 0:
            return Selection(keep=torch.arange(max(0, min(k, n)), device=device))
        metric = image.signals.get("vit_keys", image.embeds)
        keep, merged, _, sequence = bipartite_merge(metric, image.embeds, k, self.round_order)
        order = torch.searchsorted(keep, sequence) if self.round_order == "tome" else None
        return Selection(keep=keep, merged=merged.to(image.embeds.dtype), order=order)
