"""Test-only re-implementation of HiPrune's token selection as the authors' LLaVA code makes it.

Source: github.com/Danielement321/HiPrune at commit 6e83a1240874e99a25df34f54221a29bb24b7bc2,
`LLaVA/llava/model/llava_arch.py`, `LlavaMetaForCausalLM.encode_images` (with the attentions returned by
`LLaVA/llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionTower.forward`, and the AnyRes
assembly in `prepare_inputs_labels_for_multimodal`); the Qwen2.5-VL copy
(`Qwen2_5_VL/qwen2_5_vl_HiPrune.py`, the "##### HiPrune #####" block of the model's forward) uses the same
rule. Written from reading that code, not copied.

What the code computes, per view (a LLaVA-1.5 image, or each of LLaVA-NeXT's base view and tiles; all
views of the batch share the budget: `int(retention / views)` each):
  * scores of a layer = its softmax map (all 577 tokens, [CLS] included) averaged over heads, then over
    queries, with the [CLS] column dropped: one value per patch;
  * the deep layer is `attentions[mm_vision_select_layer]` (-2: the layer whose output feeds the
    projector), the object layer `attentions[HIPRUNE_OBJECT_LAYER - 1]` (9 of CLIP-L's 24);
  * anchors: top round(count * alpha / 5) patches by object-layer score;
  * anchors, anchors - 1, anchors + 1, anchors - 24, anchors + 24, clamped to [0, 575], made unique: the
    anchors with their buffers;
  * registers: top (count - that many) patches by deep-layer score after 1 is subtracted from the
    anchors' and buffers' scores (so they are never picked twice);
  * kept = the union, sorted; the LLM receives the kept patches in ascending order. On LLaVA-NeXT
    (mm_patch_merge_type forced to "spatial") the base view's kept patches come first, then the tiles'
    in the raster order of the tile mosaic; no unpadding, no image_newline.

Generalised: 24 -> the view's grid width, 575 -> its patch count - 1, and the object layer index is a
parameter (the test passes the one tokprune's adapter uses for the tower's depth). Ties cannot be
compared with torch.topk's unspecified order, so ranks here break ties towards the lower index.
"""

from __future__ import annotations

import torch


def patch_scores(attention: torch.Tensor) -> torch.Tensor:
    """(views, H, T, T) post-softmax map with [CLS] first -> (views, T - 1): head mean, query mean, [CLS]
    column removed."""
    return attention.float().mean(1).mean(1)[:, 1:]


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def select_view(obj: torch.Tensor, deep: torch.Tensor, width: int, count: int, alpha: float) -> torch.Tensor:
    """Kept patch indices (sorted) of one view from its object- and deep-layer patch scores (P,)."""
    n = obj.numel()
    anchors = _top(obj, round(count * alpha / 5))
    near = torch.cat([anchors + step for step in (0, -1, 1, -width, width)]).clamp(0, n - 1).unique()
    demoted = deep.clone()
    demoted[near] -= 1.0
    registers = _top(demoted, count - near.numel())
    return torch.cat([near, registers]).sort().values


def select(
    attentions: tuple[torch.Tensor, ...],
    retention: int,
    object_layer: int,
    deep_layer: int = -2,
    alpha: float = 0.1,
) -> list[torch.Tensor]:
    """Per view, the kept patch indices (sorted). attentions: the tower's per-layer maps (views, H, T, T);
    object_layer: 0-based index into them (the code's HIPRUNE_OBJECT_LAYER - 1)."""
    obj = patch_scores(attentions[object_layer])
    deep = patch_scores(attentions[deep_layer])
    views, patches = obj.shape
    width = round(patches**0.5)
    count = int(retention / views)
    return [select_view(obj[v], deep[v], width, count, alpha) for v in range(views)]


def next_placeholders(kept: list[torch.Tensor], grid: int, tiles: tuple[int, int]) -> torch.Tensor:
    """LLaVA-NeXT: the kept patches of the base view and of the (rows x cols) tiles as indices among the
    Hugging Face model's image placeholders (base view, then the mosaic row by row, each of its
    rows x grid rows ending in an image_newline), for an image that unpadding leaves whole."""
    rows, cols = tiles
    row_len = cols * grid + 1  # a mosaic row and its newline
    out = [kept[0]]
    base = grid * grid
    for t, patches in enumerate(kept[1:]):
        ty, tx = divmod(t, cols)
        r, c = patches // grid, patches % grid
        out.append(base + (ty * grid + r) * row_len + tx * grid + c)
    return torch.cat(out).sort().values
