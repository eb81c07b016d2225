"""Signals of a decoder layer recomputed from its own projections (the model keeps running sdpa/flash).

The layouts follow transformers' attention modules: q_proj/k_proj, optional q_norm/k_norm (Qwen3, Gemma 3),
RoPE from the (cos, sin) the decoder layer receives, GQA through `num_key_value_groups`.
"""

from __future__ import annotations

import torch
from torch import nn

from tokprune.signals.attention import last_query_attention


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, N, d); cos/sin: (B, N, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def _heads(attn: nn.Module, proj: nn.Module, norm_name: str, hidden: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, heads, N, head_dim) through `proj` and the module's optional per-head norm."""
    batch, length, _ = hidden.shape
    x = proj(hidden).view(batch, length, -1, attn.head_dim)
    norm = getattr(attn, norm_name, None)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def rotated_keys(attn: nn.Module, normed: torch.Tensor, position_embeddings) -> torch.Tensor:
    """Post-RoPE keys of all tokens: (B, N, D) normed layer input -> (B, H_kv, N, d)."""
    cos, sin = position_embeddings
    return _rope(_heads(attn, attn.k_proj, "k_norm", normed), cos, sin)


def last_query_scores(
    attn: nn.Module,
    normed: torch.Tensor,
    position_embeddings,
    key_mask: torch.Tensor,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-mean attention of the last token over all tokens at this layer: (B, N) float32.

    normed: (B, N, D) the attention module's input (after input_layernorm); key_mask: (B, N) bool real
    tokens; keys: (B, H_kv, N, d) post-RoPE keys if already at hand (e.g. from the KV cache).
    """
    cos, sin = position_embeddings
    query = _rope(_heads(attn, attn.q_proj, "q_norm", normed[:, -1:]), cos[:, -1:], sin[:, -1:])
    if keys is None:
        keys = rotated_keys(attn, normed, position_embeddings)
    return last_query_attention(query, keys, attn.scaling, key_mask)


def cached_keys(past_key_values, layer_idx: int, length: int) -> torch.Tensor | None:
    """Post-RoPE keys (B, H_kv, L, d) of `layer_idx` from a cache holding exactly this prefill's tokens."""
    layers = getattr(past_key_values, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    if keys is None or keys.dim() != 4 or keys.shape[-2] != length:
        return None
    return keys
