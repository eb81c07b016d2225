"""Test-only reading of LLaVA-PruMerge's released selection and merge, written from the authors' code (not
copied).

Source: github.com/42Shawn/LLaVA-PruMerge, commit 097c04116a58465e4bcb58cec44a94018a68ff1a,
`llava/model/multimodal_encoder/clip_encoder.py`: `CLIPVisionTower.token_prune_merge_advanced` (PruMerge),
`token_prune_merge_advanced_plus` (PruMerge+; what `forward` calls), `outlier_dectection`, `complement_idx`.

What the code does for a batch of LLaVA-1.5 images, in words:
  * hook the q_proj / k_proj outputs of the *last* CLIP layer (index 23; its input is the penultimate
    layer's output, the features LLaVA uses); attention = softmax(q · kᵀ · C^-1/2) over the full width C
    (all heads as one); a = the [CLS] row over the patches;
  * the ratio = the share of patches whose a is above Q3 + 1.5 (Q3 - Q1) (numpy's linear percentiles); the
    count = int(N * ratio); keep the top-count patches by a, in descending order of a;
  * PruMerge+ only: step = int(1 / ratio); add every int(step / 3)-th patch index from 0 below 575 (N - 1
    in general) that is not kept yet, in ascending order;
  * every kept patch i becomes x_i + sum_j a_j x_j over its 32 nearest other patches (kept or not) by cosine
    similarity of the full-width last-layer keys (x = the penultimate features, without [CLS]);
  * one more token: sum_j a_j x_j over every patch that was not kept;
  * the projector runs on [kept tokens in that order, the extra token].
"""

from __future__ import annotations

import numpy as np
import torch


def cls_attention_concat(vision, image: int, layer: int = -1) -> torch.Tensor:
    """(N,) the code's [CLS] row: one softmax over the concatenated heads, scale C^-1/2, [CLS] dropped."""
    q, k = vision.queries[layer][image], vision.keys[layer][image]  # (T, C) q_proj / k_proj outputs
    width = vision.features.shape[-1]
    return torch.softmax(q[:1] @ k.T * width**-0.5, dim=-1)[0, 1:]


def outlier_ratio(attention: torch.Tensor) -> float:
    """The code's `outlier_dectection`: share of values above the upper IQR fence (numpy percentiles)."""
    values = attention.float().numpy().flatten()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return len(np.where(values > q3 + 1.5 * (q3 - q1))[0]) / len(values)


def kept_indices(attention: torch.Tensor, plus: bool) -> list[int]:
    """The kept patch indices in the code's order (top by attention, then PruMerge+'s samples)."""
    n = attention.numel()
    ratio = outlier_ratio(attention)
    top = attention.topk(int(n * ratio)).indices.tolist()
    if not plus:
        return top
    step = int(1 / ratio)
    samples = [i for i in range(0, n - 1, int(step / 3)) if i not in set(top)]
    return top + samples


def prumerge_llava(vision, image: int, plus: bool, neighbours: int = 32) -> tuple[list[int], torch.Tensor]:
    """(kept patch indices in the code's order, (m + 1, C) the emitted features: the kept tokens, then the
    extra token) for one LLaVA-1.5 image."""
    a = cls_attention_concat(vision, image)
    x = vision.features[image].float()  # (N, C) penultimate features without [CLS]
    keys = vision.keys[-1][image, 1:].float()  # (N, C) last layer's keys without [CLS]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    kept = kept_indices(a, plus)
    rows = []
    for i in kept:
        others = [j for j in range(x.shape[0]) if j != i]
        similarity = unit[i] @ unit[others].T
        nearest = [others[j] for j in similarity.topk(neighbours).indices.tolist()]
        rows.append(x[i] + (a[nearest, None] * x[nearest]).sum(0))
    dropped = [j for j in range(x.shape[0]) if j not in set(kept)]
    rows.append((a[dropped, None] * x[dropped]).sum(0))
    return kept, torch.stack(rows)
