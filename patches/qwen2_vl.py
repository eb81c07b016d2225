"""Qwen2-VL and Qwen2.5-VL: a CLS-free ViT over flattened patches, 2x2 patch merging, M-RoPE positions.

The ViT has no [CLS] token, so the "cls_attention" signal is the attention each patch *receives* (column
mean of the softmax map, streamed) at the scoring block, averaged over the patches merged into one LLM
token. Qwen2.5-VL runs its blocks in window order (`window_index`); signals are put back in raster order.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from tokprune.core.timing import timed
from tokprune.signals import received_attention

from .base import Adapter, ImageLayout, InstanceWrap, VisionSignalStore


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: every block attends within each image (cu_seqlens); the last block feeds the merger."""

    model_classes = ("Qwen2VLForConditionalGeneration",)
    family = "qwen2_vl"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = self.inner.visual
        self.merge = self.visual.spatial_merge_size
        self.score_layer = self.default_score_layer()
        self._image_grid: torch.Tensor | None = None  # grid_thw of the latest get_image_features call
        self._in_image_call = False

    def default_score_layer(self) -> int:
        """The block whose output feeds the patch merger (the analogue of LLaVA's feature layer)."""
        return len(self.visual.blocks) - 1

    def position_rows(self) -> int:
        return 3

    def object_layer(self, num_layers: int) -> int:
        """Half the depth: the 16th of Qwen2.5-VL's 32 blocks (HiPrune's setting, counted from 1), index 15."""
        return max(0, num_layers // 2 - 1)

    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        if inner_kwargs.get("pixel_values") is None and self.precomputed_counts(inner_kwargs) is None:
            return None
        grid_thw = inner_kwargs.get("image_grid_thw")
        if grid_thw is None:  # generate() encoded the images before the prefill and passes only features
            grid_thw = self._image_grid
        if grid_thw is None:
            raise RuntimeError("precomputed image features without image_grid_thw: pass image_grid_thw")
        counts, grids = [], []
        for t, h, w in grid_thw.tolist():
            h, w = h // self.merge, w // self.merge
            counts.append(t * h * w)
            grids.append((h, w) if t == 1 else None)
        layout = ImageLayout(counts=counts, grids=grids)
        expanded = self.precomputed_counts(inner_kwargs)
        if expanded is not None and len(expanded) != len(counts):  # generate() repeated rows (beams, n>1)
            layout = layout.expanded(self.visual_mask(inner_kwargs["input_ids"]), expanded)
        return layout

    def merged_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation taking the block order of merged units back to raster order (None: identity)."""
        return None

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.visual.blocks), self.score_layer)  # validates first
        handles = [_wrap_image_features(self, store)]
        for index, wanted in by_layer.items():
            hook = self._hook(wanted, store)
            handles.append(self.visual.blocks[index].attn.register_forward_hook(hook, with_kwargs=True))
        return handles

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore):
        """Forward hook on one ViT block's attention computing `wanted` ({full name: base name}), per LLM
        token (pooled over the merged patches) in raster order. The ViT has no [CLS]: "cls_attention" is
        the attention each patch receives within its block's attention pattern."""
        group = self.merge**2

        def hook(module, args, kwargs, output):
            if not self._in_image_call:
                return  # the vision tower encoding videos
            with timed(store.seconds, output.device):
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (S, C)
                seq = hidden.shape[0]
                q, k, _ = (
                    module.qkv(hidden).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                )
                order = self.merged_order(self._image_grid)
                received = None
                for name, base in wanted.items():
                    if base == "vit_keys":  # content keys (before RoPE), head mean, pooled per merged unit
                        value = k.float().mean(1).view(seq // group, group, -1).mean(1)
                    else:  # cls_attention / received_attention
                        if received is None:
                            received = self._received(module, q, k, kwargs).view(seq // group, group).mean(1)
                        value = received
                    store.values[name] = value if order is None else value[order]

        return hook

    @staticmethod
    def _received(module, q: torch.Tensor, k: torch.Tensor, kwargs) -> torch.Tensor:
        """(S,) attention received per patch within the block's cu_seqlens blocks (images or windows)."""
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # (S, H, d)
        cu_seqlens = kwargs["cu_seqlens"]
        sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        return received_attention(q.transpose(0, 1), k.transpose(0, 1), module.scaling, sizes)


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


def _wrap_image_features(adapter: Qwen2VLAdapter, store: VisionSignalStore) -> InstanceWrap:
    """Mark vision passes that encode *images* (not videos) and remember their grid; each starts afresh."""
    original = adapter.inner.get_image_features

    @functools.wraps(original)  # generate() inspects the signature to pre-encode images
    def get_image_features(*args, **kwargs):
        adapter._image_grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)
        adapter._in_image_call = True
        store.clear()
        try:
            return original(*args, **kwargs)
        finally:
            adapter._in_image_call = False

    return InstanceWrap(adapter.inner, "get_image_features", get_image_features)
