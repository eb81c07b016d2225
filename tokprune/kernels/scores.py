"""Triton kernels for attention rows and attention received, without N x N maps.

Both signals need every row's softmax normaliser before any probability is known, so each runs in two
passes over tiles (the FlashAttention recipe without the value product):

1. a log-sum-exp kernel: one program per (query tile, head) streams over the key tiles it may see and
   keeps the running max and sum of exp (online softmax) -> lse (one float per query row and head);
2. a probability kernel that recomputes the logits tile by tile and turns them into probabilities with
   that lse: for attention *rows* one program per (row tile, key tile) sums the heads and writes the
   head mean; for attention *received* one program per (key tile, head) sums down the columns of its
   segment.

Memory: the inputs, lse (H x N) and the output; the work is that of two QKᵀ products. Logits and
probabilities are fp32 whatever the input dtype; fp32 inputs multiply in IEEE fp32 (no TF32), bf16/fp16
inputs use the tensor-core product with fp32 accumulation. Launch with tensors on a CUDA device, or on
the CPU under TRITON_INTERPRET=1 (how the tests run them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokprune.kernels import interpreting

NEG_INF = float("-inf")


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_rows(base, rows, row_stride, offs_d, row_ok, d_ok):
    """(len(rows), BLOCK_D) tile of rows of a (.., N, d) tensor whose last dim is contiguous; 0 outside."""
    return tl.load(
        base + rows[:, None] * row_stride + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )


@triton.jit
def _segment_of(tile_start_ptr, seg_start_ptr, seg_end_ptr, tile):
    """(first token, segment start, segment end) of a tile."""
    return tl.load(tile_start_ptr + tile), tl.load(seg_start_ptr + tile), tl.load(seg_end_ptr + tile)


@triton.jit
def _online_lse_step(row_max, row_sum, s):
    """One tile of an online log-sum-exp: running max row_max and sum row_sum (BLOCK,) with logits s (BLOCK, N)."""
    m_new = tl.maximum(row_max, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    row_sum = row_sum * tl.exp(row_max - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
    return m_new, row_sum


@triton.jit
def _finish_lse(row_max, row_sum):
    """log-sum-exp of the running (row_max, row_sum); +inf for a row that saw no key (its probabilities are 0)."""
    return tl.where(
        row_sum > 0,
        tl.where(row_max == float("-inf"), 0.0, row_max) + tl.log(tl.maximum(row_sum, 1e-30)),
        float("inf"),
    )


# ---------------------------------------------------------------------------------------- rows
@triton.jit
def _rows_lse_kernel(
    q_ptr, k_ptr, limit_ptr, valid_ptr, lse_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_n,
    H, T, N, D, GROUPS, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, h, tt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok, d_ok = offs_t < T, offs_d < D
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_t, sq_t, offs_d, t_ok, d_ok)  # fmt: skip
    limit = tl.load(limit_ptr + b * T + offs_t, mask=t_ok, other=-1)
    k_base = k_ptr + b * sk_b + (h // GROUPS) * sk_h
    row_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = _load_rows(k_base, offs_n, sk_n, offs_d, n_ok, d_ok)
        valid = tl.load(valid_ptr + b * N + offs_n, mask=n_ok, other=0) != 0
        s = _dot(q, tl.trans(k), IEEE) * scale
        s = tl.where(valid[None, :] & (offs_n[None, :] <= limit[:, None]), s, float("-inf"))
        row_max, row_sum = _online_lse_step(row_max, row_sum, s)
    tl.store(lse_ptr + (b * H + h) * T + offs_t, _finish_lse(row_max, row_sum), mask=t_ok)


@triton.jit
def _rows_mean_kernel(
    q_ptr, k_ptr, limit_ptr, valid_ptr, lse_ptr, out_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_n,
    H, T, N, D, GROUPS, scale,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b, tt, nt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok, n_ok, d_ok = offs_t < T, offs_n < N, offs_d < D
    limit = tl.load(limit_ptr + b * T + offs_t, mask=t_ok, other=-1)
    valid = tl.load(valid_ptr + b * N + offs_n, mask=n_ok, other=0) != 0
    visible = valid[None, :] & (offs_n[None, :] <= limit[:, None]) & t_ok[:, None]
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for h in range(0, H):
        q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_t, sq_t, offs_d, t_ok, d_ok)  # fmt: skip
        k = _load_rows(k_ptr + b * sk_b + (h // GROUPS) * sk_h, offs_n, sk_n, offs_d, n_ok, d_ok)  # fmt: skip
        lse = tl.load(lse_ptr + (b * H + h) * T + offs_t, mask=t_ok, other=float("inf"))
        s = _dot(q, tl.trans(k), IEEE) * scale
        acc += tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    out = out_ptr + b * T * N + offs_t[:, None] * N + offs_n[None, :]
    tl.store(out, acc / H, mask=t_ok[:, None] & n_ok[None, :])


def attention_rows(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    limit: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    block: int = 64,
) -> torch.Tensor:
    """Head-mean softmax rows of a few queries over all keys: (B, T, N) float32.

    query: (B, H, T, d); keys: (B, H_kv, N, d) with H a multiple of H_kv (GQA); limit: (B, T) int, query
    t of row b sees key j only if j <= limit[b, t] (None: every key); key_mask: (B, N) bool, False = never
    seen (padding). A query that sees no key gets a row of zeros.
    """
    batch, heads, rows, dim = query.shape
    n = keys.shape[2]
    query, keys = _last_dim_contiguous(query), _last_dim_contiguous(keys)
    limit = _limits(limit, batch, rows, n, query.device)
    valid = _valid(key_mask, batch, n, query.device)
    lse = torch.empty(batch, heads, rows, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, rows, n, dtype=torch.float32, device=query.device)
    block_t = max(16, min(block, triton.next_power_of_2(rows)))
    meta = {"BLOCK_T": block_t, "BLOCK_N": block, **_meta(query, dim)}
    strides = (*query.stride()[:3], *keys.stride()[:3])
    sizes = (heads, rows, n, dim, heads // keys.shape[1], scale)
    _rows_lse_kernel[(batch, heads, triton.cdiv(rows, block_t))](
        query, keys, limit, valid, lse, *strides, *sizes, **meta
    )
    _rows_mean_kernel[(batch, triton.cdiv(rows, block_t), triton.cdiv(n, block))](
        query, keys, limit, valid, lse, out, *strides, *sizes, **meta
    )
    return out


# ------------------------------------------------------------------------------------ received
@triton.jit
def _segment_lse_kernel(
    q_ptr, k_ptr, lse_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr,
    sq_h, sq_n, sk_h, sk_n, N, D, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    tile, h = tl.program_id(0), tl.program_id(1)
    r0, s0, s1 = _segment_of(tile_start_ptr, seg_start_ptr, seg_end_ptr, tile)
    offs_m = r0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < s1, offs_d < D
    q = _load_rows(q_ptr + h * sq_h, offs_m, sq_n, offs_d, m_ok, d_ok)
    row_max = tl.full([BLOCK], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK], tl.float32)
    for n0 in range(s0, s1, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        n_ok = offs_n < s1
        k = _load_rows(k_ptr + h * sk_h, offs_n, sk_n, offs_d, n_ok, d_ok)
        s = tl.where(n_ok[None, :], _dot(q, tl.trans(k), IEEE) * scale, float("-inf"))
        row_max, row_sum = _online_lse_step(row_max, row_sum, s)
    tl.store(lse_ptr + h * N + offs_m, _finish_lse(row_max, row_sum), mask=m_ok)


@triton.jit
def _segment_columns_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr, tile_start_ptr, seg_start_ptr, seg_end_ptr,
    sq_h, sq_n, sk_h, sk_n, N, D, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    tile, h = tl.program_id(0), tl.program_id(1)
    c0, s0, s1 = _segment_of(tile_start_ptr, seg_start_ptr, seg_end_ptr, tile)
    offs_n = c0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = offs_n < s1, offs_d < D
    k = _load_rows(k_ptr + h * sk_h, offs_n, sk_n, offs_d, n_ok, d_ok)
    acc = tl.zeros([BLOCK], tl.float32)
    for m0 in range(s0, s1, BLOCK):
        offs_m = m0 + tl.arange(0, BLOCK)
        m_ok = offs_m < s1
        q = _load_rows(q_ptr + h * sq_h, offs_m, sq_n, offs_d, m_ok, d_ok)
        lse = tl.load(lse_ptr + h * N + offs_m, mask=m_ok, other=float("inf"))
        s = _dot(q, tl.trans(k), IEEE) * scale
        acc += tl.sum(tl.where(m_ok[:, None] & n_ok[None, :], tl.exp(s - lse[:, None]), 0.0), 0)
    tl.store(out_ptr + h * N + offs_n, acc, mask=n_ok)


def received_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    block_sizes: list[int] | None = None,
    block: int = 64,
) -> torch.Tensor:
    """Attention received by every token, head-averaged: (N,) float32.

    query, keys: (H, N, d) for one flattened sequence of independent blocks of `block_sizes` tokens
    (block-diagonal attention; None = one block of N). Token j of a block of n gets
    (1 / (H n)) * sum over heads and the block's queries i of softmax_i(q_i . k * scale)[j].
    """
    heads, n, dim = query.shape
    sizes = block_sizes or [n]
    if sum(sizes) != n:
        raise ValueError(f"block sizes sum to {sum(sizes)} but the sequence has {n} tokens")
    query, keys = _last_dim_contiguous(query), _last_dim_contiguous(keys)
    tile_start, seg_start, seg_end = _segment_tiles(sizes, block, query.device)
    lse = torch.empty(heads, n, dtype=torch.float32, device=query.device)
    columns = torch.empty(heads, n, dtype=torch.float32, device=query.device)
    meta = {"BLOCK": block, **_meta(query, dim)}
    strides = (*query.stride()[:2], *keys.stride()[:2])
    grid = (tile_start.numel(), heads)
    tiles = (tile_start, seg_start, seg_end)
    _segment_lse_kernel[grid](query, keys, lse, *tiles, *strides, n, dim, scale, **meta)
    _segment_columns_kernel[grid](query, keys, lse, columns, *tiles, *strides, n, dim, scale, **meta)
    per_token = torch.repeat_interleave(
        torch.tensor(sizes, dtype=torch.float32, device=query.device),
        torch.tensor(sizes, device=query.device),
    )
    return columns.sum(0) / (heads * per_token)


# ------------------------------------------------------------------------------------- helpers
def _segment_tiles(sizes: list[int], block: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiles of `block` tokens that never straddle a segment: (first token, segment start, segment end)
    of every tile, int32 (T,) each."""
    starts, seg_starts, seg_ends = [], [], []
    offset = 0
    for size in sizes:
        for first in range(offset, offset + size, block):
            starts.append(first)
            seg_starts.append(offset)
            seg_ends.append(offset + size)
        offset += size
    return tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (starts, seg_starts, seg_ends))


def _limits(limit: torch.Tensor | None, batch: int, rows: int, n: int, device) -> torch.Tensor:
    if limit is None:
        return torch.full((batch, rows), n - 1, dtype=torch.int32, device=device)
    return limit.to(device=device, dtype=torch.int32).contiguous()


def _valid(key_mask: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    if key_mask is None:
        return torch.ones(batch, n, dtype=torch.int8, device=device)
    return key_mask.to(device=device, dtype=torch.int8).contiguous()


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(query: torch.Tensor, dim: int) -> dict:
    """Compile-time parameters besides the tiles: the head size padded to a power of two, and IEEE fp32
    products for fp32 inputs (and always in the interpreter, whose low-precision products are unreliable)."""
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "IEEE": query.dtype == torch.float32 or interpreting(),
    }
