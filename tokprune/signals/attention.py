"""Attention-derived token scores without materialising attention maps.

All functions take post-projection (and, where the model uses it, post-RoPE) queries/keys laid out as
(B, H, N, d) and return float32 scores averaged over heads.
"""

from __future__ import annotations

import torch


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, N, d) -> (B, H_kv * groups, N, d) for grouped-query attention."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def cls_attention(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention row of one query token (a ViT's [CLS]) over all keys.

    query: (B, H, 1, d); keys: (B, H, N, d) -> (B, N) float32, head mean of softmax(q k^T * scale).
    """
    logits = (query.float() @ keys.float().transpose(-1, -2)) * scale  # (B, H, 1, N)
    return logits.softmax(-1).mean(1)[:, 0]


def last_query_attention(
    query: torch.Tensor, keys: torch.Tensor, scale: float, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention row of the last query of a decoder layer (FastV/PyramidDrop score), GQA-aware.

    query: (B, H, 1, d) post-RoPE; keys: (B, H_kv, N, d) post-RoPE; key_mask: (B, N) bool, True = may
    be attended (left padding excluded). Returns (B, N) float32, head mean of the softmax row.
    """
    keys = _repeat_kv(keys, query.shape[1] // keys.shape[1])
    logits = (query.float() @ keys.float().transpose(-1, -2)) * scale  # (B, H, 1, N)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(1)[:, 0]


def received_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    block_sizes: list[int] | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention *received* by every token: the column mean of softmax(Q K^T * scale), head-averaged.

    query, keys: (H, N, d) for one flattened sequence holding independent blocks (images / windows) of
    `block_sizes` tokens (block-diagonal attention, as in the Qwen ViT); None = one block of N.
    Streams over `chunk` query rows at a time: memory O(H * chunk * N_block), never N x N.
    Returns (N,) float32: for token j, the mean over queries i of its block of p(i -> j).
    """
    n = query.shape[1]
    sizes = block_sizes or [n]
    out = torch.empty(n, dtype=torch.float32, device=query.device)
    start = 0
    for size in sizes:
        k_blk = keys[:, start : start + size].float()  # (H, n_b, d)
        acc = torch.zeros(size, dtype=torch.float32, device=query.device)
        for q0 in range(0, size, chunk):
            q_blk = query[:, start + q0 : start + min(q0 + chunk, size)].float()  # (H, c, d)
            probs = ((q_blk @ k_blk.transpose(-1, -2)) * scale).softmax(-1)  # (H, c, n_b)
            acc += probs.sum(dim=(0, 1))
        out[start : start + size] = acc / (size * query.shape[0])
        start += size
    return out
