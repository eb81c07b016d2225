"""Attention-derived token scores without materialising attention maps.

All functions take post-projection (and, where the model uses it, post-RoPE) queries/keys laid out as
(B, H, N, d) or (H, N, d) and return float32 scores averaged over heads.

`backend`: "auto" runs the Triton kernels of `tokprune.kernels.scores` on CUDA tensors when Triton is
installed and the chunked PyTorch code below otherwise; "torch" / "triton" force one. The PyTorch code
is the reference: it streams over query chunks sized so that one chunk's logits stay under
`CHUNK_BYTES`, so its memory grows linearly with N (the N x N map is never formed).
"""

from __future__ import annotations

import torch

from tokprune.kernels import use_triton

CHUNK_BYTES = 64 * 2**20  # fp32 logits of one query chunk (all heads) in the PyTorch path


def rows_per_chunk(heads: int, keys: int, chunk: int | None = None) -> int:
    """Query rows per chunk: `chunk` if given, else as many as keep heads x rows x keys fp32 logits (and
    their softmax) under CHUNK_BYTES, at least 1."""
    if chunk is not None:
        return max(1, chunk)
    return max(1, CHUNK_BYTES // (8 * heads * max(1, keys)))


def attention_rows(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    limit: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    chunk: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Head-mean softmax rows of a few queries over all keys, GQA-aware: (B, T, N) float32.

    query: (B, H, T, d); keys: (B, H_kv, N, d); limit: (B, T) query t of row b sees key j only if
    j <= limit[b, t] (None: all keys; a causal row passes its own position); key_mask: (B, N) bool,
    False = never seen (left padding). A query that sees no key gets zeros.
    """
    if use_triton(backend, query, keys):
        from tokprune.kernels import scores

        return scores.attention_rows(query, keys, scale, limit, key_mask)
    batch, heads, rows, dim = query.shape
    kv_heads, n = keys.shape[1], keys.shape[2]
    keys = keys.float()  # GQA without repeating the keys: each KV head serves its group of query heads
    positions = torch.arange(n, device=keys.device)
    step = rows_per_chunk(heads, n, chunk)
    out = []
    for t0 in range(0, rows, step):
        q = query[:, :, t0 : t0 + step].float()
        c = q.shape[2]
        grouped = q.reshape(batch, kv_heads, (heads // kv_heads) * c, dim)  # (B, H_kv, G*c, d)
        logits = ((grouped @ keys.transpose(-1, -2)) * scale).view(batch, heads, c, n)  # (B, H, c, N)
        visible = torch.ones_like(logits[:, 0], dtype=torch.bool)  # (B, c, N)
        if limit is not None:
            visible = visible & (positions <= limit[:, t0 : t0 + step, None].to(keys.device))
        if key_mask is not None:
            visible = visible & key_mask[:, None, :]
        probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        out.append(probs.mean(1))
    return torch.cat(out, dim=1)


def cls_attention(
    query: torch.Tensor, keys: torch.Tensor, scale: float, backend: str = "auto"
) -> torch.Tensor:
    """Attention row of one query token (a ViT's [CLS]) over all keys.

    query: (B, H, 1, d); keys: (B, H, N, d) -> (B, N) float32, head mean of softmax(q k^T * scale).
    """
    return attention_rows(query, keys, scale, backend=backend)[:, 0]


def last_query_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention row of the last query of a decoder layer (FastV/PyramidDrop score), GQA-aware.

    query: (B, H, 1, d) post-RoPE; keys: (B, H_kv, N, d) post-RoPE; key_mask: (B, N) bool, True = may
    be attended (left padding excluded). Returns (B, N) float32, head mean of the softmax row.
    """
    return attention_rows(query, keys, scale, key_mask=key_mask, backend=backend)[:, 0]


def received_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    block_sizes: list[int] | None = None,
    chunk: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention *received* by every token: the column mean of softmax(Q K^T * scale), head-averaged.

    query, keys: (H, N, d) for one flattened sequence holding independent blocks (images / windows) of
    `block_sizes` tokens (block-diagonal attention, as in the Qwen ViT); None = one block of N.
    Streams over query chunks (`rows_per_chunk`): memory O(H * chunk * N_block), never N x N.
    Returns (N,) float32: for token j, the mean over queries i of its block of p(i -> j).
    """
    if use_triton(backend, query, keys):
        from tokprune.kernels import scores

        return scores.received_attention(query, keys, scale, block_sizes)
    n = query.shape[1]
    sizes = block_sizes or [n]
    out = torch.empty(n, dtype=torch.float32, device=query.device)
    start = 0
    for size in sizes:
        k_blk = keys[:, start : start + size].float()  # (H, n_b, d)
        acc = torch.zeros(size, dtype=torch.float32, device=query.device)
        step = rows_per_chunk(query.shape[0], size, chunk)
        for q0 in range(0, size, step):
            q_blk = query[:, start + q0 : start + min(q0 + step, size)].float()  # (H, c, d)
            probs = ((q_blk @ k_blk.transpose(-1, -2)) * scale).softmax(-1)  # (H, c, n_b)
            acc += probs.sum(dim=(0, 1))
        out[start : start + size] = acc / (size * query.shape[0])
        start += size
    return out
