"""Test-only re-implementation of VTC-CLS's token selection as the authors' LLaVA code makes it.

Source: github.com/THU-MIG/VTC-CLS at commit e41ac9b4c0db235b3f68a84dbd6bd35f24156a7c,
`llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionTower.cls_token_only` (per layer of
`attentions[start_layer:-1]`: the head mean of the map, its [CLS] row without the [CLS] column; summed
over those layers) and `llava/model/llava_arch.py`, `LlavaMetaForCausalLM.encode_images` (method
"VTC-CLS": `torch.topk` of `token_num`, then the kept tokens re-sorted by position). The start layer is a
command-line argument of every benchmark script (`--layer`). The code hard-codes one 576-token LLaVA-1.5
image (`torch.arange(0, 576)`, `squeeze(0)`); generalised to the image's patch count. Written from reading
that code, not copied. Ties: ascending index (torch.topk leaves them unspecified).
"""

from __future__ import annotations

import torch


def select(attentions: tuple[torch.Tensor, ...], count: int, start_layer: int) -> torch.Tensor:
    """attentions: the tower's per-layer maps (1, H, T, T), [CLS] first; start_layer: the code's
    `--layer` (an index into them; layers start_layer .. the second-to-last are summed). Returns (count,)
    the kept patch indices, sorted."""
    rows = [a[0].float().mean(0)[0, 1:] for a in attentions[start_layer:-1]]
    score = torch.stack(rows).sum(0)
    return torch.sort(score, descending=True, stable=True).indices[:count].sort().values
