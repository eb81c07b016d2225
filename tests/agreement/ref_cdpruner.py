"""Test-only re-implementation of CDPruner's token selection as the authors' LLaVA code makes it.

Source: github.com/Theia-4869/CDPruner at commit 9541616c40fcd5625de1cdb8ea6c33c129eb7864,
`llava/model/llava_arch.py`, `LlavaMetaForCausalLM.encode_images` (similarity, relevance, kernel and
the fast greedy MAP loop) and `prepare_inputs_labels_for_multimodal` (LLaVA-NeXT: every crop a row of the
batch, merge type reduced to "spatial"); the relevance inputs come from
`llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionTower.forward`. Written from reading that
code, not copied.

What the code computes for a batch of B crops (one LLaVA-1.5 image, or LLaVA-NeXT's base view and tiles)
of N patches each, keeping `count` per crop:
  * similarity = cosine of the projector outputs, per crop (B, N, N), in float32;
  * relevance = mean over text embeddings of minus the cosine between each patch embedding and the text
    embedding, then (r - min + 1e-6) / (max - min) with min / max over the whole (B, N) batch;
  * kernel = r_i * similarity_ij * r_j;
  * greedy MAP (Chen et al. 2018), per crop: `count` times, take the argmax of the residuals d_i^2 (the
    kernel's diagonal at first), e = (L[j] - c[:, j] . c) / sqrt(d_j^2), d^2 -= e^2, d_j^2 = -inf;
  * kept = the chosen indices sorted, per crop; on LLaVA-NeXT the base view's kept tokens first, then
    the tiles' in the mosaic's raster order.

The code's patch and text embeddings are CLIP's (the projected post-layernorm patch features and the
CLIP text tower's embedding of the question). The Hugging Face LLaVA has no CLIP text tower, so this
reference takes what tokprune can take (its deliberate difference (1)): the projector outputs as the
patch embeddings and the LLM input embeddings of the text after the image as the text embeddings. Ties
follow torch.argmax (the first maximum).
"""

from __future__ import annotations

import torch


def select(features: torch.Tensor, patch_embeds: torch.Tensor, text_embeds: torch.Tensor, count: int):
    """features: (B, N, D) projector outputs; patch_embeds: (B, N, C); text_embeds: (M, C). Returns (B,
    count) the kept indices of every crop, sorted."""
    batch = features.shape[0]
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = unit.float() @ unit.float().transpose(1, 2)
    img = patch_embeds.float() / patch_embeds.float().norm(dim=-1, keepdim=True)
    txt = text_embeds.float() / text_embeds.float().norm(dim=-1, keepdim=True)
    relevance = (-(img @ txt.T)).mean(-1)  # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
    rows = torch.arange(batch)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    factors = torch.zeros(count, batch, features.shape[1])
    chosen = torch.empty(count, batch, dtype=torch.long)
    for step in range(count):
        j = residual.argmax(-1)
        chosen[step] = j
        projected = torch.einsum("tb,tbn->bn", factors[:step, rows, j], factors[:step])
        e = (kernel[rows, j] - projected) / residual[rows, j].sqrt()[:, None]
        factors[step] = e
        residual = residual - e.square()
        residual[rows, j] = -torch.inf
    return chosen.T.sort(-1).values
