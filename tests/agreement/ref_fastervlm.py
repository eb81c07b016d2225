"""Test-only re-implementation of FasterVLM's token selection as the authors' LLaVA code makes it.

Source: github.com/Theia-4869/FasterVLM at commit f5d5f12037e105a51865ecb4b28a73cd86eb4921,
`llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionTower.feature_select` (the attention map of
the feature layer, `attentions[mm_vision_select_layer]`, its [CLS] row without the [CLS] column) and
`llava/model/llava_arch.py`, `LlavaMetaForCausalLM.encode_images` (head mean, `torch.topk` of the
visual token count per crop, an index mask: kept tokens in their original order). On LLaVA-NeXT every crop
(base view and tiles) is a row of that batch, so each keeps the same count; the merge type is fixed to
"spatial" (base view's kept tokens first, then the tile mosaic's in raster order, no newlines). Written
from reading that code, not copied. Ties: ascending index (torch.topk leaves them unspecified).
"""

from __future__ import annotations

import torch


def cls_scores(attention: torch.Tensor) -> torch.Tensor:
    """(crops, H, T, T) post-softmax map, [CLS] first -> (crops, T - 1) head-mean [CLS] row."""
    return attention[:, :, 0, 1:].float().mean(1)


def select(attentions: tuple[torch.Tensor, ...], count: int, layer: int = -2) -> list[torch.Tensor]:
    """Per crop, the `count` kept patch indices (sorted)."""
    scores = cls_scores(attentions[layer])
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
    return list(order.sort(dim=1).values)
