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
probabilities are fp32 whatever the input dtype. The query's dtype sets the product (keys are cast to it):
fp32 multiplies in IEEE fp32 (no TF32); bf16/fp16 takes the tensor-core product with fp32 accumulation,
on a GPU only (Triton's CPU interpreter is always given IEEE fp32 products). Launch with tensors on a CUDA
device (the launch is placed on the query's device), or on the CPU under TRITON_INTERPRET=1 (how the CPU
tests run them). Offsets are int64: inputs past 2^31 elements address correctly. Neither kernel has run on
a GPU in this project yet.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from tokprune.errors import UnsupportedInputError
from tokprune.kernels import interpreting

NEG_INF = float("-inf")


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _i64(x):
    """x as int64, so that offsets built from it do not wrap at 2^31 elements."""
    return tl.cast(x, tl.int64)


@triton.jit
def _load_rows(base, rows, row_stride, offs_d, row_ok, d_ok):
    """(len(rows), BLOCK_D) tile of rows of a (.., N, d) tensor whose last dim is contiguous; 0 outside.
    Offsets in int64 (a tensor past 2^31 elements)."""
    offsets = tl.cast(rows, tl.int64)[:, None] * row_stride + offs_d[None, :]
    return tl.load(base + offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


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
    b, h, tt = _i64(tl.program_id(0)), _i64(tl.program_id(1)), tl.program_id(2)
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
    b, tt, nt = _i64(tl.program_id(0)), tl.program_id(1), tl.program_id(2)
    offs_t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok, n_ok, d_ok = offs_t < T, offs_n < N, offs_d < D
    limit = tl.load(limit_ptr + b * T + offs_t, mask=t_ok, other=-1)
    valid = tl.load(valid_ptr + b * N + offs_n, mask=n_ok, other=0) != 0
    visible = valid[None, :] & (offs_n[None, :] <= limit[:, None]) & t_ok[:, None]
    acc = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
    for head in range(0, H):
        h = _i64(head)
        q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_t, sq_t, offs_d, t_ok, d_ok)  # fmt: skip
        k = _load_rows(k_ptr + b * sk_b + (h // GROUPS) * sk_h, offs_n, sk_n, offs_d, n_ok, d_ok)  # fmt: skip
        lse = tl.load(lse_ptr + (b * H + h) * T + offs_t, mask=t_ok, other=float("inf"))
        s = _dot(q, tl.trans(k), IEEE) * scale
        acc += tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
    out = out_ptr + b * T * N + _i64(offs_t)[:, None] * N + offs_n[None, :]
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
    seen (padding). A query that sees no key gets a row of zeros. Keys of another dtype are cast to the
    query's (whose dtype picks the product precision, see `_meta`).
    """
    _check_rows(query, keys, limit, key_mask)
    batch, heads, rows, dim = query.shape
    n = keys.shape[2]
    query, keys = _last_dim_contiguous(query), _last_dim_contiguous(keys.to(query.dtype))
    limit = _limits(limit, batch, rows, n, query.device)
    valid = _valid(key_mask, batch, n, query.device)
    lse = torch.empty(batch, heads, rows, dtype=torch.float32, device=query.device)
    out = torch.empty(batch, rows, n, dtype=torch.float32, device=query.device)
    block_t = max(16, min(block, triton.next_power_of_2(rows)))
    meta = {"BLOCK_T": block_t, "BLOCK_N": block, **_meta(query, dim)}
    strides = (*query.stride()[:3], *keys.stride()[:3])
    sizes = (heads, rows, n, dim, heads // keys.shape[1], scale)
    with _on_device_of(query):
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
    tile, h = tl.program_id(0), _i64(tl.program_id(1))
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
    tile, h = tl.program_id(0), _i64(tl.program_id(1))
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
    (1 / (H n)) * sum over heads and the block's queries i of softmax_i(q_i . k * scale)[j]. The keys need
    the query's heads (no GQA here: a ViT); keys of another dtype are cast to the query's.
    """
    _check_received(query, keys)
    heads, n, dim = query.shape
    sizes = _block_sizes(block_sizes, n)
    query, keys = _last_dim_contiguous(query), _last_dim_contiguous(keys.to(query.dtype))
    tile_start, seg_start, seg_end = _segment_tiles(sizes, block, query.device)
    lse = torch.empty(heads, n, dtype=torch.float32, device=query.device)
    columns = torch.empty(heads, n, dtype=torch.float32, device=query.device)
    meta = {"BLOCK": block, **_meta(query, dim)}
    strides = (*query.stride()[:2], *keys.stride()[:2])
    grid = (tile_start.numel(), heads)
    tiles = (tile_start, seg_start, seg_end)
    with _on_device_of(query):
        _segment_lse_kernel[grid](query, keys, lse, *tiles, *strides, n, dim, scale, **meta)
        _segment_columns_kernel[grid](query, keys, lse, columns, *tiles, *strides, n, dim, scale, **meta)
    per_token = torch.repeat_interleave(
        torch.tensor(sizes, dtype=torch.float32, device=query.device),
        torch.tensor(sizes, device=query.device),
    )
    return columns.sum(0) / (heads * per_token)


# ------------------------------------------------------------------------------------- helpers
def _on_device_of(tensor: torch.Tensor):
    """Launch on `tensor`'s GPU (a model split across GPUs: the current device may be another one)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else nullcontext()


def _check_rows(query: torch.Tensor, keys: torch.Tensor, limit, key_mask) -> None:
    """Shapes of `attention_rows`: query (B, H, T, d), keys (B, H_kv, N, d), H a multiple of H_kv,
    limit (B, T), key_mask (B, N), all on one device."""
    if query.dim() != 4 or keys.dim() != 4:
        raise UnsupportedInputError(
            f"attention rows need query (B, H, T, d) and keys (B, H_kv, N, d), got {tuple(query.shape)} "
            f"and {tuple(keys.shape)}"
        )
    (batch, heads, rows, dim), (k_batch, kv_heads, n, k_dim) = query.shape, keys.shape
    if k_batch != batch or k_dim != dim or kv_heads == 0 or heads % kv_heads:
        raise UnsupportedInputError(
            f"keys {tuple(keys.shape)} do not fit query {tuple(query.shape)}: same batch and head size, "
            "and query heads a multiple of the key heads (GQA)"
        )
    for name, value, shape in (("limit", limit, (batch, rows)), ("key_mask", key_mask, (batch, n))):
        if value is not None and tuple(value.shape) != shape:
            raise UnsupportedInputError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    _check_devices(query, keys, limit, key_mask)


def _check_received(query: torch.Tensor, keys: torch.Tensor) -> None:
    """Shapes of `received_attention`: query and keys (H, N, d) alike (every query head has its keys)."""
    if query.dim() != 3 or query.shape != keys.shape:
        raise UnsupportedInputError(
            f"attention received needs query and keys of one shape (H, N, d), got {tuple(query.shape)} and "
            f"{tuple(keys.shape)} (repeat grouped key heads to the query heads first)"
        )
    _check_devices(query, keys)


def _check_devices(*tensors) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise UnsupportedInputError(
            f"the kernel's inputs must be on one device, got {sorted(map(str, devices))}"
        )


def _block_sizes(block_sizes: list[int] | None, n: int) -> list[int]:
    """The segment sizes (one block of n when None): non-negative, summing to n."""
    sizes = list(block_sizes) if block_sizes else [n]
    if any(size < 0 for size in sizes) or sum(sizes) != n:
        raise UnsupportedInputError(
            f"block sizes must be >= 0 and sum to the sequence's {n} tokens, got {sizes[:8]} (sum {sum(sizes)})"
        )
    return sizes


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
    products for fp32 queries (the keys were cast to the query's dtype). bf16 / fp16 queries take the
    tensor-core product (`tl.dot` on the half-precision tiles, fp32 accumulation) on a GPU only: the
    interpreter always multiplies in IEEE fp32 (its low-precision products are unreliable), so the CPU
    tests never run that branch."""
    return {
        "BLOCK_D": max(16, triton.next_power_of_2(dim)),
        "IEEE": query.dtype == torch.float32 or interpreting(),
    }
