"""Test-only re-implementation of ToMe's merge step, applied in rounds to the LLM's visual tokens.

Source: github.com/facebookresearch/ToMe at commit af95e4b1befa172dadccd8c81e223b10090f9579,
`tome/merge.py`: `bipartite_soft_matching` (one matching round and its `merge` closure) and `merge_wavg`
(size-weighted averaging); `tome/patch/timm.py` (`ToMeAttention` returns the head mean of the keys as
the metric, `ToMeBlock` calls the two). Cross-read with the LLaVA port in github.com/ModelTC/LightCompress
(commit 9701d035b0aac5df97a2ebaadb30bcf0707616f5, llmc/compression/token_reduction/tome.py), which
calls the same function inside every CLIP encoder layer. Written from reading that code, not copied.

One round on t tokens, as ToMe computes it:
  * r is capped at (t - protected) // 2 (protected = 1 with a class token, else 0);
  * the metric is L2-normalised; A = tokens at even positions, B = odd positions; each A token's score is
    its best cosine to a B token (a protected class token, A's first, gets -inf, so it never merges);
  * A tokens sorted by score, descending: the first r are merged into their best B partner (scatter-sum
    of size-weighted values, then divided by the summed sizes: `merge_wavg`), the rest stay;
  * output sequence: [unmerged A tokens in that sorted order, then all B tokens in order].

tokprune's pre-LLM ToMe generalises this to "merge down to exactly k": rounds with r = t - k (capped as
above) until k tokens remain, on the LLM input embeddings, with the head-mean keys of the ViT layer
feeding the projector as the metric and each merged token's metric the size-weighted mean of its members'
(there is no next ViT layer to recompute it). `order="raster"` (tokprune's default) re-sorts every round's
output by original index before the next A/B split; `order="tome"` keeps ToMe's output order. Every
token carries the original index of the token it is (for a B token that absorbed others, its own), which
is the position tokprune gives it. Ties in the sort go to the lower index here (ToMe's argsort leaves
them unspecified).
"""

from __future__ import annotations

import torch


def head_mean_keys(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """(T, C) k_proj output -> (T, C / heads) the mean over heads (ToMe's metric `k.mean(1)`)."""
    t, c = keys.shape
    return keys.float().view(t, heads, c // heads).mean(1)


def tome_round(metric: torch.Tensor, r: int, protected: int = 0):
    """The matching of one round on (t, d) metric: (r used, unmerged A positions in output order, merged
    A positions, their B partners as indices among B)."""
    t = metric.shape[0]
    r = min(r, (t - protected) // 2)
    unit = metric / metric.norm(dim=-1, keepdim=True)
    scores = unit[0::2] @ unit[1::2].T
    if protected:
        scores[0, :] = -torch.inf
    best, partner = scores.max(dim=-1)
    edges = torch.sort(best, descending=True, stable=True).indices
    return r, edges[r:], edges[:r], partner[edges[:r]]


def apply_round(x: torch.Tensor, unmerged, merged, partner) -> torch.Tensor:
    """ToMe's `merge(x, mode="sum")`: (t, c) -> (t - r, c) = [x_A[unmerged], x_B with x_A[merged] added
    into their partners]."""
    a, b = x[0::2], x[1::2].clone()
    b.index_add_(0, partner, a[merged])
    return torch.cat([a[unmerged], b])


def merge_to(metric: torch.Tensor, embeds: torch.Tensor, k: int, order: str = "raster"):
    """Merge n tokens down to k. Returns (ids (k,) the survivors' original indices in output order,
    embeds (k, D) their size-weighted means, members (k, n) bool: the original tokens in each)."""
    n = metric.shape[0]
    x, m = embeds.double(), metric.double()
    size = torch.ones(n, 1, dtype=torch.float64)
    ids = torch.arange(n)
    members = torch.eye(n, dtype=torch.float64)
    while x.shape[0] > k:
        _, *matching = tome_round(m, x.shape[0] - k)
        new_size = apply_round(size, *matching)
        x = apply_round(x * size, *matching) / new_size
        m = apply_round(m * size, *matching) / new_size
        members = apply_round(members, *matching)
        unmerged = matching[0]
        ids = torch.cat([ids[0::2][unmerged], ids[1::2]])
        size = new_size
        if order == "raster":
            perm = torch.argsort(ids)
            x, m, size, ids, members = x[perm], m[perm], size[perm], ids[perm], members[perm]
    return ids, x, members > 0
