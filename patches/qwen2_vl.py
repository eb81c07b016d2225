"""Qwen2-VL and Qwen2.5-VL: a CLS-free ViT over flattened patches, 2x2 patch merging, M-RoPE positions.

The ViT has no [CLS] token, so the "cls_attention" signal is the attention each patch *receives* (column
mean of the softmax map, streamed) at the scoring block, averaged over the patches merged into one LLM
token. Qwen2.5-VL runs its blocks in window order (`window_index`); signals are put back in raster order.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from tokprune.core.timing import timed
from tokprune.signals import received_attention

from .base import Adapter, ImageLayout, VisionSignalStore


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: every block attends within each image (cu_seqlens); the last block feeds the merger."""

    model_classes = ("Qwen2VLForConditionalGeneration",)
    family = "qwen2_vl"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = self.inner.visual
        self.merge = self.visual.spatial_merge_size
        self.score_layer = self.default_score_layer()
        self._grids: list[torch.Tensor] = []  # grid_thw of each vision call since the last prefill

    def default_score_layer(self) -> int:
        """The block whose output feeds the patch merger (the analogue of LLaVA's feature layer)."""
        return len(self.visual.blocks) - 1

    def position_rows(self) -> int:
        return 3

    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        grid_thw = inner_kwargs.get("image_grid_thw")
        if inner_kwargs.get("pixel_values") is not None:
            self._grids.clear()  # the vision tower runs inside this forward
        elif self.precomputed_counts(inner_kwargs) is None:
            return None
        elif grid_thw is None:  # generate() ran the vision tower before the prefill: images came first
            if not self._grids:
                raise RuntimeError("precomputed image features without image_grid_thw: pass image_grid_thw")
            grid_thw = self._grids[0]
            self._grids.clear()
        counts, grids = [], []
        for t, h, w in grid_thw.tolist():
            h, w = h // self.merge, w // self.merge
            counts.append(t * h * w)
            grids.append((h, w) if t == 1 else None)
        return ImageLayout(counts=counts, grids=grids)

    def merged_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation taking the block order of merged units back to raster order (None: identity)."""
        return None

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        group = self.merge**2

        def remember_grid(module, args, kwargs):
            if not self._grids:  # first vision call since the last prefill: drop any unconsumed signals
                store.clear()
            self._grids.append(kwargs.get("grid_thw", args[1] if len(args) > 1 else None))

        handles = [self.visual.register_forward_pre_hook(remember_grid, with_kwargs=True)]
        if not names:
            return handles

        def hook(module, args, kwargs, output):
            if all(name in store.values for name in names):
                return  # a later vision call of the same forward (videos): images come first
            with timed(store.seconds, output.device):
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (S, C)
                cu_seqlens = kwargs["cu_seqlens"]
                seq = hidden.shape[0]
                q, k, _ = (
                    module.qkv(hidden).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                )
                order = self.merged_order(self._grids[-1])
                if "vit_keys" in names:  # content keys (before RoPE), head mean, pooled per merged unit
                    keys = k.float().mean(1).view(seq // group, group, -1).mean(1)
                    store.values.setdefault("vit_keys", keys if order is None else keys[order])
                if "cls_attention" in names:
                    cos, sin = kwargs["position_embeddings"]
                    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # (S, H, d)
                    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
                    recv = received_attention(q.transpose(0, 1), k.transpose(0, 1), module.scaling, sizes)
                    recv = recv.view(seq // group, group).mean(1)
                    store.values.setdefault("cls_attention", recv if order is None else recv[order])

        block = self.visual.blocks[self.score_layer]
        return [*handles, block.attn.register_forward_hook(hook, with_kwargs=True)]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: windowed blocks except `fullatt_block_indexes`; scores come from the last full block."""

    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    family = "qwen2_5_vl"

    def default_score_layer(self) -> int:
        return max(self.visual.fullatt_block_indexes)

    def merged_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.merge,
            window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
        )
        return torch.argsort(window_index)
