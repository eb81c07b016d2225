"""Test-only reading of the FoPru selection in the public implementation FoPru's docstring cites, written
from that code (not copied). It is not the paper's official release: none was found (see fopru.py).

Source: github.com/dongxianzhe/hydrainfer, commit d4d5f4fed1e10f5bd8e17867ad13237fe76f9927 (HEAD):
  * `hydrainfer/layer/token_prunning.py`, `focal_prunning(tokens, scores, n_output_tokens, strategy)` (the
    selection) and the deprecated `FocalPrunning(ratio, strategy)` module (the same selection with a
    ratio; its "row" variant keeps `floor(rows * ratio)` whole rows);
  * the caller and the scores, read at the commits that still had them (the caller was dropped later):
    d357ace49f53977a6f7aa25edd7eb24ac11f3d64 / 0c5000e7d87097195acfb2b02d8e1c4df2d22349,
    `dxz/model/llava.py` `image_embed`: `focal_prunning(hidden_states[:, 1:], scores[:, :, 1:, 1:],
    n_output_tokens, strategy='rank')`; `dxz/model/clip.py` `CLIPEncoder` / `CLIPEncoderLayer`: the
    scores of the layer at index `vision_feature_layer % n_layers` (-2: the layer whose output LLaVA
    projects), `dxz/layer/attention.py` `TorchMultiHeadAttention(..., return_scores=True)`: the scores are
    `(q / sqrt(head_dim)) @ k^T` per head, *before* the softmax.

What the code does for one image, in words: take the pre-softmax logits of that layer per head, keep the
patch rows and patch columns only ([CLS] row and column dropped), average over heads; s1 = the mean of every
column (over the patch queries: what a patch receives), s2 = the mean of every row (over the patch keys:
what a patch gives); the significance is s1 if var(s1) > var(s2) (torch.var, unbiased) else s2. "rank" keeps
the `n_output_tokens` patches of highest significance, "row" (the deprecated module) ranks the rows of the
sqrt(P) x sqrt(P) grid by their summed significance and keeps `floor(rows * ratio)` whole rows; the kept
patches go out in ascending (raster) order. (The function's own "row" branch slices `n_output_tokens`
*rows*, which cannot fill its `n_output_tokens`-token output; the caller uses "rank" only.)

Generalised from LLaVA-1.5's numbers only in that the grid side is sqrt(P) of the capture's patches.
"""

from __future__ import annotations

import math

import torch


def means(queries: torch.Tensor, keys: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((P,) column means, (P,) row means) of the head-mean pre-softmax logits over the patches of one
    image. queries, keys: (T, C) q_proj / k_proj outputs of the scoring layer, [CLS] first."""
    t, c = queries.shape
    d = c // heads
    q = queries.float().view(t, heads, d).transpose(0, 1) / math.sqrt(d)  # (H, T, d), scaled as the code does
    k = keys.float().view(t, heads, d).transpose(0, 1)
    scores = (q @ k.transpose(1, 2))[:, 1:, 1:].mean(0)  # (P, P) head-mean logits, patch rows and columns
    return scores.mean(0), scores.mean(1)


def significance(queries: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """(P,) the code's significance of one image: the column means if their (unbiased) variance is larger
    than the row means', else the row means."""
    received, given = means(queries, keys, heads)
    return received if torch.var(received).item() > torch.var(given).item() else given


def fopru_rank(queries: torch.Tensor, keys: torch.Tensor, heads: int, n_output_tokens: int) -> list[int]:
    """The caller's setting (strategy 'rank'): kept patch indices (0 .. P-1), ascending."""
    sig = significance(queries, keys, heads)
    top = torch.sort(sig, descending=True).indices[:n_output_tokens]
    return sorted(top.tolist())


def fopru_rows(queries: torch.Tensor, keys: torch.Tensor, heads: int, ratio: float) -> list[int]:
    """The deprecated module's 'row' strategy: floor(rows * ratio) whole rows of the square patch grid."""
    sig = significance(queries, keys, heads)
    side = math.isqrt(sig.numel())
    assert side * side == sig.numel()
    rows = torch.sort(sig.view(side, side).sum(1), descending=True).indices[: math.floor(side * ratio)]
    return sorted((rows[:, None] * side + torch.arange(side)).flatten().tolist())


def fopru_llava(vision, layer: int, n_output_tokens: int) -> list[list[int]]:
    """Per image of a LLaVA-1.5 capture, the kept patch indices ('rank'). layer: index into the encoder
    layers of the scoring layer (the code's vision_feature_layer % n_layers)."""
    return [
        fopru_rank(q, k, vision.heads, n_output_tokens)
        for q, k in zip(vision.queries[layer], vision.keys[layer])
    ]
