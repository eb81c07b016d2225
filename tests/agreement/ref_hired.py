"""Test-only reading of HiRED's released selection (LLaVA-NeXT), written from the authors' code (not copied).

Source: github.com/hasanar1f/HiRED, commit 502d6dd79a03e87cc808cedba8b8a951d93cb62b,
transformers/src/transformers/models/llava_next/modeling_llava_next.py:
  * `ViT_Attn_Hook.get_attn`: the attention of a ViT layer recomputed from its q_proj / k_proj outputs,
    softmax(q k^T * head_dim ** -0.5) per head;
  * `LlavaNextForConditionalGeneration.forward`: hooks on layer 0 ("top") and layer 22 ("bottom"; the
    layer whose output is LLaVA-NeXT's feature, hidden_states[-2] of 24 layers), `HiRED_token_selection`,
    then `pack_HiRED_image_features(..., image_newline=None)`;
  * `HiRED_token_selection` / `HiRED_sub_img_budgets`: the budget split and the top-k choices;
  * `pack_HiRED_image_features`: the masks laid out like the features, unpadded, applied.
accuracy_benchmarks/llava_1.6_*.sh: token_budget_rate 0.2, alpha 0.5.

What the code does for one image of P = 1 + T tower inputs of V = 576 patches each (base view first, then
the tiles in row-major tile order), in words: take the [CLS] row over the V patches of both layers' maps
and sum it over heads. Budget = int(P * V * rate); base share = min(int(budget * alpha), V); tiles' share
= min(budget - base share, T * V). The base view keeps its base-share top patches by layer-22 attention.
Mark the int(V * (1 - alpha)) base patches of largest layer-0 attention; cut the base view's V patches,
in raster order, into T equal consecutive runs, run t for tile t; tile t's budget = int(marked in run t /
all marked * tiles' share), at most V. Tile t keeps its budget's top patches by layer-22 attention among
all its V patches. Packing: base view kept patches in order; the tiles' masks laid out as the tile mosaic
(rows of tiles, each 24 x 24), unpadded to the image's aspect ratio, the kept positions in raster order;
no newline tokens.

Generalised here: the layer indices (0 and the feature layer, -2 of the tiny tower's layers, where the
code has 22 of 24), the head count and V. The mosaic is laid out as current transformers does (the code's
transformers 4.42.dev lays non-square tile grids out transposed, a bug fixed since), so on 1 x 2 / 2 x 1
grids this reproduces the code's choices per tile, on the model tokprune runs.
"""

from __future__ import annotations

import torch


def layer_cls_attention(queries: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """(P, V): the [CLS] row of softmax(q k^T / sqrt(d)) over the V patches, summed over heads, from the
    layer's q_proj / k_proj outputs (P, 1 + V, C)."""
    p, t, c = queries.shape
    d = c // heads
    q = queries.view(p, t, heads, d).transpose(1, 2)
    k = keys.view(p, t, heads, d).transpose(1, 2)
    attention = torch.softmax((q @ k.transpose(-2, -1)) * d**-0.5, dim=-1)
    return attention[:, :, 0, 1:].sum(1)


def hired_masks(
    early: torch.Tensor, final: torch.Tensor, rate: float = 0.2, alpha: float = 0.5
) -> torch.Tensor:
    """(P, V) bool: the code's choices on every tower input, before unpadding. early / final: (P, V) head
    sums of the [CLS] rows of layer 0 / the feature layer."""
    inputs, v = final.shape
    tiles = inputs - 1
    budget = int(inputs * v * rate)
    base_budget = min(int(budget * alpha), v)
    tile_budget = min(budget - base_budget, tiles * v)
    mask = torch.zeros(inputs, v, dtype=torch.bool)
    mask[0, final[0].topk(base_budget).indices] = True
    if tile_budget > 0:
        marked = torch.zeros(v, dtype=torch.bool)
        marked[early[0].topk(int(v * (1 - alpha))).indices] = True
        per_tile = marked.reshape(tiles, -1).sum(-1)  # run t of the base view for tile t
        shares = ((per_tile / per_tile.sum()) * tile_budget).int().clamp(max=v)
        for t, share in enumerate(shares.tolist()):
            mask[1 + t, final[1 + t].topk(share).indices] = True
    return mask


def unpadded(size_hw: tuple[int, int], rows: int, cols: int) -> tuple[slice, slice]:
    """The code's `unpad_image` on a (rows, cols) mosaic of an image of `size_hw` (height, width): the kept
    rows and columns (int() of the scaled side, the margin split evenly)."""
    height, width = size_hw
    if width / height > cols / rows:
        keep = int(height * (cols / width))
        pad = (rows - keep) // 2
        return slice(pad, rows - pad), slice(0, cols)
    keep = int(width * (rows / height))
    pad = (cols - keep) // 2
    return slice(0, rows), slice(pad, cols - pad)


def packed_kept(
    mask: torch.Tensor, tiles_hw: tuple[int, int], size_hw: tuple[int, int]
) -> tuple[list[int], int]:
    """The kept tokens the LLM gets, as image-placeholder positions of transformers' packing (base view,
    then the unpadded mosaic with a newline after every row; the code drops the newlines, which only shifts
    positions), and the number of tokens the code keeps before unpadding."""
    v = mask.shape[1]
    side = round(v**0.5)
    th, tw = tiles_hw
    mosaic = mask[1:].reshape(th, tw, side, side).transpose(1, 2).reshape(th * side, tw * side)
    rows, cols = unpadded(size_hw, th * side, tw * side)
    mosaic = mosaic[rows, cols]
    width = mosaic.shape[1]
    kept = mask[0].nonzero().squeeze(1).tolist()
    for r, c in mosaic.nonzero().tolist():
        kept.append(v + r * (width + 1) + c)
    return kept, int(mask.sum())


def hired_official(case, rate: float = 0.2, alpha: float = 0.5) -> tuple[list[int], int]:
    """(kept image-placeholder positions, tokens chosen before unpadding) for a one-image LLaVA-NeXT case."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vision, model = case.vision, case.model
    early = layer_cls_attention(vision.queries[0], vision.keys[0], vision.heads)
    final = layer_cls_attention(vision.queries[-2], vision.keys[-2], vision.heads)
    mask = hired_masks(early, final, rate, alpha)
    size = tuple(case.inputs["image_sizes"][0].tolist())
    cfg = model.config
    tiles_hw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    return packed_kept(mask, tiles_hw, size)
