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


# ---------------------------------------------------------------------------------- pre-softmax logits
# Signals read off the *logits* of a ViT layer (q k^T * scale before the softmax), as some authors' code
# scores tokens. Means of logits are linear in q and k, so no N x N map is ever formed: the mean over the
# queries i of q_i . k_j equals (mean_i q_i) . k_j.

LOGIT_SIGNALS = (
    "cls_logits",
    "cls_attention_concat",
    "logit_column_mean",
    "logit_row_mean",
    "received_attention_concat",
    "vit_keys_concat",
)
CLS_SIGNALS = ("cls_logits", "cls_attention_concat")  # signals of the [CLS] query
# what a signal of the [CLS] query means on a tower without [CLS] (SigLIP, Qwen), as "cls_attention" there is
# the attention each patch receives: the same quantity of the attention (logits) each patch receives
WITHOUT_CLS = {"cls_logits": "logit_column_mean", "cls_attention_concat": "received_attention_concat"}


def cls_logits(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Head mean of the scaled pre-softmax logits of one query (a ViT's [CLS]) over all keys.

    query: (B, H, 1, d); keys: (B, H, N, d) -> (B, N) float32: mean_h (q_h . k_{h, j}) * scale.
    """
    return (keys.float() @ query.float().transpose(-1, -2))[..., 0].mean(1) * scale


def cls_attention_concat(query: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One softmax over the concatenated heads (PruMerge's [CLS] attention): softmax(q K^T * scale).

    query: (B, 1, C) the [CLS] row of the full-width query projection; keys: (B, N, C) full width;
    scale: C ** -0.5 when None. Returns (B, N) float32 (every row sums to 1).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    return ((query.float() @ keys.float().transpose(-1, -2))[:, 0] * scale).softmax(-1)


def _member_mean(x: torch.Tensor, members: torch.Tensor | None) -> torch.Tensor:
    """(..., H, N, d) -> (..., H, 1, d): mean over the tokens (dim -2) that `members` (..., N) marks."""
    x = x.float()
    if members is None:
        return x.mean(-2, keepdim=True)
    weight = members.to(x.device, torch.float32)[..., None, :, None]  # (..., 1, N, 1)
    return (x * weight).sum(-2, keepdim=True) / weight.sum(-2, keepdim=True).clamp_min(1.0)


def _logit_mean(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    members: torch.Tensor | None,
    block_sizes: list[int] | None,
    over: str,
) -> torch.Tensor:
    if block_sizes is not None:
        parts, start = [], 0
        for size in block_sizes:
            cut = slice(start, start + size)
            part = None if members is None else members[..., cut]
            parts.append(_logit_mean(query[..., cut, :], keys[..., cut, :], scale, part, None, over))
            start += size
        return torch.cat(parts, dim=-1)
    if over == "queries":  # column mean: (mean_i q_i) . k_j
        fixed, other = _member_mean(query, members), keys.float()
    else:  # row mean: q_i . (mean_j k_j)
        fixed, other = _member_mean(keys, members), query.float()
    return (other @ fixed.transpose(-1, -2))[..., 0].mean(-2) * scale


def logit_column_mean(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    members: torch.Tensor | None = None,
    block_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Mean logit every token *receives*: the column mean of the head-mean map q k^T * scale (pre-softmax).

    query, keys: (..., H, N, d); members: (..., N) bool, the query tokens the mean runs over (e.g. the
    patches, a [CLS] left out; None = all); block_sizes: independent blocks of tokens along N (block-
    diagonal attention, as in the Qwen ViT), each averaged over its own queries. Returns (..., N) float32:
    for token j, mean_h mean_{i in members of j's block} q_{h, i} . k_{h, j} * scale, computed as
    (mean_i q_i) . k_j (memory O(N d)).
    """
    return _logit_mean(query, keys, scale, members, block_sizes, "queries")


def logit_row_mean(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    members: torch.Tensor | None = None,
    block_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Mean logit every token *gives*: the row mean of the head-mean map q k^T * scale (pre-softmax).

    As `logit_column_mean` with queries and keys swapped: members marks the key tokens the mean runs
    over; for token i, mean_h mean_{j in members of i's block} q_{h, i} . k_{h, j} * scale.
    """
    return _logit_mean(query, keys, scale, members, block_sizes, "keys")


def logit_signal(
    base: str,
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    members: torch.Tensor | None = None,
    block_sizes: list[int] | None = None,
) -> torch.Tensor:
    """One of LOGIT_SIGNALS for every token of n ViT inputs, as a signal hook computes it.

    queries, keys: (n, H, T, d) as the layer's attention uses them (after its q/k norms and RoPE), the
    [CLS] token (for the CLS_SIGNALS) at position 0; members: (n, T) or (T,) bool, the tokens the logit
    means run over (the patches: a [CLS] and padding left out; None = all); block_sizes: see
    `logit_column_mean` (only for the means, which also take one flattened sequence (H, T, d), as the
    Qwen ViT gives it, and return (T,)). Returns (n, T) float32:
      "cls_logits": head-mean scaled logit of the [CLS] query on every key (GlobalCom²'s score);
      "cls_attention_concat": softmax over all keys of the [CLS] query with the heads concatenated,
          q_cls . K^T * C ** -0.5 with C = H * d (PruMerge's score);
      "logit_column_mean" / "logit_row_mean": see those functions (FoPru's scores);
      "received_attention_concat": the attention each token receives with the heads concatenated (one
          softmax, scale C ** -0.5; `cls_attention_concat` on a tower without [CLS]);
      "vit_keys_concat": (n, T, C) the full-width keys (PruMerge's similarity).
    """
    if base == "cls_logits":
        return cls_logits(queries[:, :, :1], keys, scale)
    if base == "cls_attention_concat":
        n, heads, length, dim = keys.shape
        query = queries[:, :, :1].transpose(1, 2).reshape(n, 1, heads * dim)  # the projection's own layout
        return cls_attention_concat(query, keys.transpose(1, 2).reshape(n, length, heads * dim))
    if base == "vit_keys_concat":  # the full-width keys (the heads concatenated, the projection's layout)
        return keys.float().transpose(-3, -2).flatten(-2)
    if base == "received_attention_concat":
        return _received_concat(queries, keys, members, block_sizes)
    if members is not None and members.dim() == 1:
        members = members.expand(queries.shape[0], -1)
    if base == "logit_column_mean":
        return logit_column_mean(queries, keys, scale, members, block_sizes)
    if base == "logit_row_mean":
        return logit_row_mean(queries, keys, scale, members, block_sizes)
    raise ValueError(f"unknown logit signal {base!r} (known: {', '.join(LOGIT_SIGNALS)})")


def _received_concat(
    queries: torch.Tensor, keys: torch.Tensor, members: torch.Tensor | None, block_sizes: list[int] | None
) -> torch.Tensor:
    """The attention each token receives, the heads concatenated into one (scale C ** -0.5): queries, keys
    (n, H, T, d), or one flattened sequence (H, T, d) of `block_sizes` blocks; members (n, T) / (T,) the
    tokens taking part (others get 0). Returns (n, T) / (T,) float32."""
    if queries.dim() == 3:
        return _received_concat(queries[None], keys[None], members, block_sizes)[0]
    n, heads, length, dim = keys.shape
    width = heads * dim
    q = queries.transpose(1, 2).reshape(n, 1, length, width)  # one head of width C
    k = keys.transpose(1, 2).reshape(n, 1, length, width)
    out = torch.zeros(n, length, dtype=torch.float32, device=keys.device)
    for i in range(n):
        part = torch.ones(length, dtype=torch.bool, device=keys.device)
        if members is not None:
            part = (members if members.dim() == 1 else members[i]).to(keys.device).bool()
        sizes = block_sizes if members is None else None
        out[i, part] = received_attention(q[i][:, part], k[i][:, part], width**-0.5, sizes)
    return out


VIT_SIGNALS = ("cls_attention", "received_attention", "vit_keys", *LOGIT_SIGNALS)


def vit_signal(base: str, queries, keys: torch.Tensor, scale: float, has_cls: bool) -> torch.Tensor:
    """One ViT-layer signal for every token of n images, from the layer's own projections.

    base: one of VIT_SIGNALS; queries: (n, H, T, d), or a callable returning them (called only where the
    signal needs queries); keys: (n, H, T, d); has_cls: token 0 is a [CLS] token (left out of the logit
    means). Returns (n, T) float32 ("vit_keys": (n, T, d), the head-mean keys):
      "cls_attention": the head-mean softmax row of the [CLS] query;
      "received_attention": the head-mean attention each token receives (column mean, streamed);
      LOGIT_SIGNALS: see `logit_signal`.
    The HF adapters' hooks and the vLLM plugin's call this, so both compute the same quantity.
    """
    if base == "vit_keys":
        return keys.float().mean(1)
    q = queries() if callable(queries) else queries
    if base == "cls_attention":
        return cls_attention(q[:, :, :1], keys, scale)
    if base == "received_attention":
        return torch.stack([received_attention(qi, ki, scale) for qi, ki in zip(q, keys)])
    if base in LOGIT_SIGNALS:
        patches = torch.arange(keys.shape[2], device=keys.device) >= int(has_cls)
        return logit_signal(base, q, keys, scale, patches)
    raise ValueError(f"unknown ViT signal {base!r} (known: {', '.join(VIT_SIGNALS)})")
