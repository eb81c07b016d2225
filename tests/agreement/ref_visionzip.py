"""Test-only reading of VisionZip's released selection, written from the authors' code (not copied).

Source: github.com/dvlab-research/VisionZip, commit 3151f6df4fca36a4cd1c985e5956e725b1f9ad02,
  * `visionzip/clip_encoder.py`, `CLIPVisionTower_VisionZip.forward` (the selection and the merge),
  * `visionzip/utils.py`, `CLIPAttention_forward` / `CLIP_EncoderLayer_forward` (the metric: the layer's
    keys, head mean, of the layer the attention is read from),
  * `visionzip/main.py`, `visionzip(model, dominant, contextual)` (dominant counts the [CLS] token:
    `dominant_num = dominant - 1` patches are chosen besides it),
  * `visionzip/llava_arch.py`, `encode_images_visionzip` (the projector runs on the kept tokens) and
    `restore_image_features_sorted` (LLaVA-NeXT: tiles' dominant patches back in the mosaic, then every
    tile's [CLS], then every tile's contextual tokens).

What the code does for one ViT pass, in words: read the attention map and the output of the second-to-last
encoder layer; sum the [CLS] row over heads, take the top `dominant - 1` patches; with [CLS] they form the
dominant set, emitted in token order. From the other patches (token order), take every `step`-th as a
target (`step = max(1, remaining // contextual)`, the first `contextual` of them); give every non-target
patch to the target of highest cosine similarity of the head-mean keys; a contextual token is the target's
feature plus the mean of its patches' features. Emit dominant then contextual tokens; project them.
"""

from __future__ import annotations

import torch


def visionzip_pass(
    attention: torch.Tensor,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    heads: int,
    dominant: int,
    contextual: int,
) -> tuple[list[int], torch.Tensor]:
    """One image / tile. attention: (H, T, T) post-softmax map of layer -2; hidden: (T, C) hidden_states[-2];
    keys: (T, C) k_proj output of layer -2; dominant: the code's `dominant` argument ([CLS] included).
    Returns (the emitted ViT token indices: dominant ones then the contextual targets, [CLS] = 0; the (m, C)
    emitted features)."""
    t = hidden.shape[0]
    per_head = keys.view(t, heads, -1).mean(1)  # (T, d) the metric
    row = attention[:, 0, 1:].sum(0)  # (T - 1,) [CLS] row over the patches, summed over heads
    chosen = set((row.topk(dominant - 1).indices + 1).tolist()) | {0}
    dominant_ids = sorted(chosen)  # token order, as a boolean-mask selection gives them
    remaining = [i for i in range(t) if i not in chosen]
    unit = per_head[remaining] / per_head[remaining].norm(dim=-1, keepdim=True)
    step = max(1, len(remaining) // contextual)
    target_pos = list(range(0, len(remaining), step))[:contextual]
    other_pos = [p for p in range(len(remaining)) if p not in set(target_pos)]
    similarity = unit[other_pos] @ unit[target_pos].T
    owner = similarity.argmax(1)
    contextual_rows = []
    for j, target in enumerate(target_pos):
        members = [remaining[other_pos[i]] for i in (owner == j).nonzero().squeeze(1).tolist()]
        mean = hidden[members].mean(0) if members else torch.zeros_like(hidden[0])
        contextual_rows.append(hidden[remaining[target]] + mean)
    emitted = dominant_ids + [remaining[p] for p in target_pos]
    features = torch.cat([hidden[dominant_ids], torch.stack(contextual_rows)])
    return emitted, features


def split(k: int, ratio: float = 10 / 64) -> tuple[int, int]:
    """The published (dominant, contextual) for k tokens: 64 -> (54, 10), 128 -> (108, 20), 192 -> (162, 30)."""
    contextual = round(k * ratio)
    return k - contextual, contextual


def visionzip_llava(vision, image: int, k: int) -> tuple[list[int], torch.Tensor]:
    """LLaVA-1.5: one image's emitted ViT tokens and their (k, C) features (before the projector)."""
    dominant, contextual = split(k)
    return visionzip_pass(
        vision.attentions[-2][image], vision.hidden_states[-2][image], vision.keys[-2][image], vision.heads,
        dominant, contextual,
    )  # fmt: skip
