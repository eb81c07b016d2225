"""Ragged batches as packed tokens: unpad / pad, cumulative lengths, and a reference varlen attention.

After pruning, the rows of a batch keep different numbers of tokens and are left-padded to a common
length. transformers' flash_attention_2 path turns the 2-D padding mask that tokprune hands every
decoder layer into packed tokens and `cu_seqlens` and calls flash-attn's variable-length kernel, so no
attention is computed on padding. This module holds the same bookkeeping (so that it can be tested on
its own) and a PyTorch implementation of flash-attn's two entry points with flash-attn's semantics
(bottom-right aligned causal mask, inclusive `window_size`, GQA, softcap), used as the CPU stand-in for
the kernel when tokprune's tests run transformers' flash_attention_2 code on a machine without a GPU.

Layouts follow flash-attn: packed tensors are (total_tokens, heads, head_dim); `cu_seqlens` (B + 1,)
int32 holds the offset of every sequence in the packed tensor.

The stand-in refuses what flash-attn 2 refuses (`check_flash_inputs`): inputs other than fp16 / bf16
(transformers hands the kernel an fp32 model's fp32 activations as they are, and flash-attn raises),
q / k / v of different dtypes, head sizes above 256, query heads that are not a multiple of the key
heads, cu_seqlens that are not int32, a last dimension that is not contiguous. So a configuration that
passes on the CPU does not fail on the GPU for a reason the CPU could have seen. `allow_fp32=True` is the
one explicit opt-in beyond flash-attn: fp32 inputs, for exact CPU comparisons of fp32 models against sdpa
(the arithmetic is fp32 in every case; only the dtype check is relaxed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokprune.errors import UnsupportedInputError


def cu_seqlens_of(lengths: torch.Tensor) -> torch.Tensor:
    """(B,) sequence lengths -> (B + 1,) int32 cumulative offsets, starting at 0."""
    return F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))


def unpad(x: torch.Tensor, mask: torch.Tensor, unused_mask=None):
    """Packed real tokens of a padded batch.

    x: (B, L, ...); mask: (B, L) bool/int, nonzero = real token. Returns (packed (T, ...), indices (T,)
    into the flattened (B * L) positions, cu_seqlens (B + 1,) int32, longest length (int), lengths (B,)
    int32) — flash-attn's `unpad_input` contract (`unused_mask` is accepted and must be None).
    """
    if unused_mask is not None:
        raise ValueError("unused_mask (allocated but unused cache slots) is not supported")
    lengths = mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    packed = x.reshape(-1, *x.shape[2:])[indices]
    return packed, indices, cu_seqlens_of(lengths), int(lengths.max()), lengths


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Inverse of `unpad`: (T, ...) packed tokens back to (batch, length, ...), zeros at padding."""
    out = packed.new_zeros(batch * length, *packed.shape[1:])
    out[indices] = packed
    return out.view(batch, length, *packed.shape[1:])


def visible_keys(q_len: int, k_len: int, causal: bool, window: tuple[int, int], device) -> torch.Tensor:
    """(q_len, k_len) bool: which keys each query of one sequence may attend, as flash-attn decides it.

    Queries are aligned to the *end* of the keys (query r sits at key position r + k_len - q_len, so a
    decode step's query sees the whole cache); causal hides later keys; window (left, right), -1 =
    unbounded, keeps keys with position - left <= key <= position + right.
    """
    position = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    key = torch.arange(k_len, device=device)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    left, right = window
    if causal:
        visible &= key <= position
    if left >= 0:
        visible &= key >= position - left
    if right >= 0:
        visible &= key <= position + right
    return visible


FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # flash-attn 2's largest head size


def check_flash_inputs(q, k, v, cu_seqlens: tuple = (), allow_fp32: bool = False) -> None:
    """Raise `UnsupportedInputError` for inputs flash-attn 2 refuses (see the module docstring).

    q: (..., H, d); k, v: (..., H_kv, d); cu_seqlens: the cumulative-length tensors of a varlen call.
    """
    allowed = FLASH_DTYPES + ((torch.float32,) if allow_fp32 else ())
    if q.dtype not in allowed:
        hint = " (or allow_fp32=True for an exact CPU comparison)" if q.dtype == torch.float32 else ""
        raise UnsupportedInputError(
            f"flash attention supports fp16 and bf16 inputs only, got {q.dtype}: run the model in "
            f"torch.bfloat16 or torch.float16{hint}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise UnsupportedInputError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise UnsupportedInputError(
            f"flash attention supports head sizes up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
        )
    if q.shape[-2] % k.shape[-2] or k.shape[-2] != v.shape[-2]:
        raise UnsupportedInputError(
            f"query heads ({q.shape[-2]}) must be a multiple of the key/value heads ({k.shape[-2]}, {v.shape[-2]})"
        )
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise UnsupportedInputError("q, k and v must have a contiguous last dimension")
    if any(c.dtype != torch.int32 for c in cu_seqlens):
        raise UnsupportedInputError("cu_seqlens must be int32")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of every packed sequence on its own: (T_q, H, d) in q's dtype (fp32 arithmetic).

    q: (T_q, H, d); k, v: (T_k, H_kv, d) with H a multiple of H_kv; sequence i is
    q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] against k/v[cu_seqlens_k[i]:cu_seqlens_k[i+1]]. A query that
    sees no key returns zeros.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].float().transpose(0, 1)  # (H, n_q, d)
        ks = k[k0:k1].float().transpose(0, 1).repeat_interleave(groups, 0)  # (H, n_k, d)
        vs = v[k0:k1].float().transpose(0, 1).repeat_interleave(groups, 0)
        logits = (qs @ ks.transpose(-1, -2)) * scale
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        visible = visible_keys(q1 - q0, k1 - k0, causal, window, q.device)
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[q0:q1] = (probs @ vs).transpose(0, 1).to(q.dtype)
    return out


# ---------------------------------------------------------------- flash-attn's API, in PyTorch
def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, deterministic: bool = False,
    allow_fp32: bool = False,
):  # fmt: skip
    """flash_attn.flash_attn_varlen_func for inference (no dropout), computed by `varlen_attention`;
    refuses what flash-attn refuses (`check_flash_inputs`; allow_fp32: the documented fp32 opt-in)."""
    if dropout_p:
        raise UnsupportedInputError("the reference flash attention is for inference: dropout_p must be 0")
    check_flash_inputs(q, k, v, (cu_seqlens_q, cu_seqlens_k), allow_fp32)
    return varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, tuple(window_size), softcap
    )


def flash_attn_func(
    q, k, v, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, deterministic: bool = False,
    allow_fp32: bool = False,
):  # fmt: skip
    """flash_attn.flash_attn_func (dense (B, L, H, d) inputs, every row a full sequence)."""
    batch, q_len = q.shape[:2]
    k_len = k.shape[1]
    cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (batch + 1) * k_len, k_len, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, q_len, k_len,
        dropout_p, softmax_scale, causal, window_size, softcap, deterministic, allow_fp32,
    )  # fmt: skip
    return out.view(batch, q_len, *out.shape[1:])
