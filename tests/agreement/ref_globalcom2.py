"""Test-only reading of GlobalCom²'s released selection for LLaVA-NeXT, written from the authors' code (not
copied).

Source: github.com/xuyang-liu16/GlobalCom2, commit 96b2d00b86a22495285ab448cc89faedafddd78d,
  * `llava/model/multimodal_encoder/apply_customvit.py`, `CustomCLIPAttention.forward`: every layer also
    returns `attn_scores`, the head mean of `(q_proj(x) * scale) @ k^T`, *before* the softmax
    (scale = head_dim ** -0.5); `CustomCLIPEncoder` collects them per layer;
  * `llava/model/llava_arch.py`, `prepare_inputs_labels_for_multimodal`: `attn_maps[-1][:, 0, 1:]`, the
    [CLS] row of the *last* layer's scores over the patches, one row per view (thumbnail, then crops);
    `compress_thumbnail` (the thumbnail's top `int(576 * retention_ratio)` by that row, emitted in
    descending score); `generate_scale_for_crop_features(..., temperature=10.0)` (the crop ratios);
    `compress_crops` with `extract_actual_dimensions`, `get_actual_crop_dimensions`,
    `interpolate_and_split_cls_attn_scores` and `select_topk_crop_features` (the tokens in the crops and
    the order they reach the LLM); `retention_ratio = 0.25`.

What the code does for one image, in words (S = tiles' patch side, the thumbnail is S x S too):
  1. thumbnail: its int(S^2 R) patches of highest [CLS] logit, in descending order;
  2. crop ratios: the thumbnail's S x S scores are cut into equal blocks by the tile grid (rows x cols
     tiles; blocks of S // rows x S // cols, the remainder joining the last block row / column), summed
     per block; sigma = exp((s - max s) / 10) / (sum + 1e-8); ratio_j = min(1, R (1 + sigma_j - mean sigma));
  3. unpadding: on the padded mosaic (rows S x cols S tokens) the same rows (or columns) as LLaVA's
     `unpad_image` stay; every crop's remaining patches, in its row-major order, are its tokens (N_j);
  4. global scores: the thumbnail's scores resized bilinearly (align_corners=False) to the bounding box
     of the remaining area, then cut into the crops' remaining rectangles, walking the tile grid;
  5. crop j keeps its int(N_j ratio_j) tokens of highest L2-normalised own score + L2-normalised global
     score (torch.topk);
  6. emission: the thumbnail's kept patches, then every crop's kept tokens written into the padded
     mosaic at the *index among the crop's remaining tokens* (not their own position: for a shortened
     crop the two differ), read out row by row, a newline after every padded row.

Here the image sizes are transformers' (height, width) (the code's PIL sizes are (width, height)), and the
tile grid comes from transformers' `get_anyres_image_grid_shape` (the same pinpoint choice). Nothing is
specific to LLaVA's 24 x 24 beyond S. Newline tokens are not listed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def cls_logits_last_layer(vision, heads: int) -> torch.Tensor:
    """(views, P) the code's `attn_maps[-1][:, 0, 1:]`: head-mean pre-softmax logits of the [CLS] query."""
    q, k = vision.queries[-1].float(), vision.keys[-1].float()  # (V, T, C)
    views, t, c = q.shape
    d = c // heads
    q = (q * d**-0.5).view(views, t, heads, d).transpose(1, 2)  # the code scales the query projection
    k = k.view(views, t, heads, d).transpose(1, 2)
    return (q[:, :, :1] @ k.transpose(-1, -2))[:, :, 0].mean(1)[:, 1:]


def crop_scales(base: torch.Tensor, rows: int, cols: int, ratio: float, temperature: float = 10.0) -> list:
    """Step 2: the retention ratio of every crop of the rows x cols tile grid (raster order)."""
    side = math.isqrt(base.numel())
    block_w, block_h = max(side // cols, 1), max(side // rows, 1)
    sums = np.zeros(rows * cols)
    for index, value in enumerate(base.tolist()):
        i, j = divmod(index, side)
        sums[min(i // block_h, rows - 1) * cols + min(j // block_w, cols - 1)] += value
    exp = np.exp((sums - np.max(sums)) / temperature)
    sigma = exp / (np.sum(exp) + 1e-8)
    return np.clip(ratio * (1 + sigma - np.mean(sigma)), None, 1.0).tolist()


def remaining_area(image_size: tuple[int, int], rows: int, cols: int, side: int) -> torch.Tensor:
    """Step 3: (rows * side, cols * side) bool, the padded mosaic's tokens that unpadding keeps."""
    height, width = image_size
    cur_h, cur_w = rows * side, cols * side
    mask = torch.zeros(cur_h, cur_w, dtype=torch.bool)
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        mask[pad : cur_h - pad, :] = True
    else:
        new_w = int(width * (cur_h / height))
        pad = (cur_w - new_w) // 2
        mask[:, pad : cur_w - pad] = True
    return mask


def globalcom2_image(
    scores: torch.Tensor, image_size: tuple[int, int], grid: tuple[int, int], ratio: float = 0.25
) -> list[tuple[int, int]]:
    """One LLaVA-NeXT image. scores: (1 + rows * cols, P) `cls_logits_last_layer` of its views (thumbnail
    first, crops in raster order); image_size: (height, width); grid: (rows, cols) tiles. Returns the kept
    tokens in the order the code emits them, each (view, patch): view 0 the thumbnail, 1 + j crop j; patch
    the token's own index in its view's S x S grid."""
    rows, cols = grid
    side = math.isqrt(scores.shape[1])
    base = scores[0]
    emitted = [(0, int(p)) for p in torch.argsort(base, descending=True)[: int(base.numel() * ratio)]]
    scales = crop_scales(base, rows, cols, ratio)
    mask = remaining_area(image_size, rows, cols, side)
    # the remaining area's bounding box, and every crop's remaining rectangle (h_j, w_j)
    box_h = int(mask.any(1).sum())
    box_w = int(mask.any(0).sum())
    tiles = mask.view(rows, side, cols, side).permute(0, 2, 1, 3)  # (rows, cols, side, side)
    big = F.interpolate(
        base.view(1, 1, side, side), size=(box_h, box_w), mode="bilinear", align_corners=False
    )
    big = big[0, 0]
    placed = []  # (row, col) in the padded mosaic, (view, patch) of every kept crop token
    r0 = 0
    for i in range(rows):
        c0 = 0
        for j in range(cols):
            local = tiles[i, j].reshape(-1).nonzero().squeeze(1)  # the crop's remaining patches, row-major
            h = int(tiles[i, j].any(1).sum())
            w = int(tiles[i, j].any(0).sum())
            glob = big[r0 : r0 + h, c0 : c0 + w].reshape(-1)
            own = scores[1 + i * cols + j][local]
            combined = F.normalize(own, dim=0) + F.normalize(glob, dim=0)
            top = torch.topk(combined, int(local.numel() * scales[i * cols + j])).indices
            for t in top.tolist():  # t: index among the remaining tokens, written as a position of the tile
                placed.append(
                    ((i * side + t // side, j * side + t % side), (1 + i * cols + j, int(local[t])))
                )
            c0 += w
        r0 += int(tiles[i, 0].any(1).sum())
    return emitted + [token for _, token in sorted(placed)]
