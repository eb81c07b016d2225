"""FLOPs of the vision side of a prefill: every ViT pass, the projector, and what the signals cost there.

One *pass* is one sequence the vision encoder attends over: an image (LLaVA-1.5, Gemma 3), an AnyRes
tile or base view (LLaVA-NeXT, LLaVA-OneVision), a tile or thumbnail (InternVL), a frame (SmolVLM,
Idefics3, LLaVA-OneVision video), an image or a clip (Qwen2/2.5/3-VL, whose attention blocks are its
frames, or on Qwen2.5-VL's windowed blocks its windows). Its cost, for n tokens (with [CLS] where the
tower has one) of which P are patches, is::

    patch embedding   2·P·C·v                      (v = channels · temporal patch · p², the conv's kernel)
    every layer       2·n·W  +  4·A·Σ_b n_b²        (W = Σ in·out over the layer's Linear modules:
                                                     q, k, v (or fused qkv), output, MLP;
                                                     A = the attention width, heads · head_dim)
    SigLIP pooling head (where the tower runs one): its probe query, k/v of the n tokens, one
                      attention row, the output projection and its MLP on the one pooled token

with the attention blocks n_b the whole pass (one block of n) unless the family splits it. Every encoder
layer counts, also when the feature layer is not the last (transformers runs them all). The projector
is 2·r·W_proj for the r rows it maps (W_proj = Σ in·out of its Linear modules): the patches of each pass
(plus [CLS] under LLaVA's "full" strategy), InternVL's and SmolVLM's pixel-shuffled tokens (P·ratio² and
P/s²), Qwen's merged tokens S/u through the merger and, on Qwen3-VL, every deepstack merger too; Gemma 3
multiplies its pooled tokens by one (C, d) matrix. Widths come from the model's own modules, so fused or
unusual projections are counted as they run. Pooling, interpolation, norms and the like are not matmuls
and count 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class VitPass:
    """One sequence through the vision encoder: n tokens, P patches, its full-attention blocks."""

    tokens: int
    patches: int
    blocks: list[int]  # block sizes of a full-attention layer (sum = tokens)
    windows: list[int] | None = None  # Qwen2.5-VL: block sizes of its windowed layers


@dataclass
class VisionCost:
    """FLOPs of the vision tower and the projector of one prefill, and the passes they came from."""

    vision: float = 0.0
    projector: float = 0.0
    passes: list[VitPass] = field(default_factory=list)
    attention_width: int = 0  # A of the tower's attention layers (heads · head_dim)
    has_cls: bool = False  # the tower's passes start with a [CLS] token
    # FLOPs of projecting one row again (`Adapter.project`: a merged row of a method on the features)
    row_projection: float = 0.0
    # Qwen2.5-VL: the encoder's depth, its windowed layers (attending within VitPass.windows) and the layer
    # whose output feeds the merger (where a signal without "@layer" is taken), for the signals' cost
    depth: int = 0
    windowed: frozenset[int] = frozenset()
    feature_layer: int | None = None

    def blocks_at(self, p: VitPass, layer: str) -> list[int]:
        """The attention blocks of pass `p` at a signal's layer ("" = the feature layer, "-1", "3", ...)."""
        if not self.windowed or p.windows is None:
            return p.blocks
        index = (
            self.feature_layer
            if not layer
            else int(layer) % self.depth
            if layer.lstrip("-").isdigit()
            else None
        )
        return p.windows if index in self.windowed else p.blocks


# ----------------------------------------------------------------------------------- module widths
def linear_width(module: nn.Module) -> int:
    """Σ in_features · out_features over the nn.Linear modules inside `module` (FLOPs per row / 2)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _conv_volume(module: nn.Module) -> tuple[int, int]:
    """(out channels, kernel volume in·k...) of the first Conv2d/Conv3d inside `module`."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return m.out_channels, m.weight[0].numel()
    raise TypeError(f"{type(module).__name__} has no patch-embedding convolution")


def _attention_width(layer: nn.Module) -> int:
    """heads · head_dim of an encoder layer: the output width of its query (or a third of its fused qkv)."""
    for name, m in layer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(m, nn.Linear) and leaf in ("q_proj", "query"):
            return m.out_features
        if isinstance(m, nn.Linear) and leaf == "qkv":
            return m.out_features // 3
    raise TypeError(f"cannot find the query projection of {type(layer).__name__}")


@dataclass
class Tower:
    """The per-pass cost model of one vision encoder (see the module docstring)."""

    layers: list[nn.Module]
    patch_embed: nn.Module
    head: nn.Module | None = None  # SigLIP's attention-pooling head, where it runs
    windowed: frozenset[int] = frozenset()  # layers that attend within VitPass.windows (Qwen2.5-VL)

    def cost(self, passes: list[VitPass]) -> tuple[float, int]:
        """(FLOPs of every pass, attention width A)."""
        channels, volume = _conv_volume(self.patch_embed)
        attention = _attention_width(self.layers[0])
        widths = [linear_width(layer) for layer in self.layers]
        total = 0.0
        for p in passes:
            total += 2.0 * p.patches * channels * volume
            for i, width in enumerate(widths):
                blocks = p.windows if i in self.windowed and p.windows is not None else p.blocks
                total += 2.0 * p.tokens * width + 4.0 * attention * sum(b * b for b in blocks)
            total += self._head(p.tokens)
        return total, attention

    def _head(self, n: int) -> float:
        """SigLIP's MultiheadAttentionPoolingHead: one probe query over the n tokens, then an MLP."""
        if self.head is None:
            return 0.0
        c = self.head.attention.embed_dim
        projections = 2.0 * c * c + 2.0 * n * c * 2 * c + 2.0 * c * c  # probe q, k/v of every token, out
        return projections + 2.0 * 2 * n * c + 2.0 * linear_width(self.head.mlp)


# ----------------------------------------------------------------------------------- the families
def _grid_patches(pixel_values: torch.Tensor, patch: int) -> int:
    height, width = pixel_values.shape[-2:]
    return (height // patch) * (width // patch)


def _patch_size(vision_config) -> int:
    p = vision_config.patch_size
    return int(p[0] if isinstance(p, (list, tuple)) else p)


def _clip_tower(vision_model: nn.Module) -> Tower:
    """CLIP / SigLIP / Idefics3 / InternViT towers: embeddings + encoder layers (+ SigLIP's head)."""
    embeddings = vision_model.embeddings
    encoder = vision_model.encoder
    layers = list(getattr(encoder, "layers", None) or encoder.layer)
    head = getattr(vision_model, "head", None)
    if head is not None and not getattr(vision_model, "use_head", True):
        head = None
    return Tower(layers=layers, patch_embed=embeddings, head=head)


def _vision_model(tower: nn.Module) -> nn.Module:
    """The transformer inside a *VisionModel wrapper (CLIPVisionModel.vision_model, SiglipVisionModel...)."""
    return getattr(tower, "vision_model", tower)


def _uniform_passes(count: int, patches: int, cls: bool) -> list[VitPass]:
    n = patches + int(cls)
    return [VitPass(tokens=n, patches=patches, blocks=[n]) for _ in range(count)]


def _projector_rows(model, passes: list[VitPass], cls: bool) -> int:
    """Rows LLaVA-style projectors map: each pass's tokens minus [CLS] under the "default" strategy."""
    strategy = getattr(model.config, "vision_feature_select_strategy", "default")
    drop = int(cls and strategy == "default")
    return sum(p.tokens - drop for p in passes)


def _has_cls(vision_model: nn.Module) -> bool:
    embeddings = vision_model.embeddings
    return hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token")


def _llava_like(model, passes_of: Callable[[dict, int, bool], list[VitPass]], inputs: dict) -> VisionCost:
    """LLaVA-1.5 / NeXT / OneVision: a CLIP or SigLIP tower per pass, the 2-layer MLP projector per row.

    passes_of(inputs, patch size, has [CLS]) -> the passes of this prefill."""
    inner = model.model
    vision_model = _vision_model(inner.vision_tower)
    cls = _has_cls(vision_model)
    passes = passes_of(inputs, _patch_size(model.config.vision_config), cls)
    if not passes:
        return VisionCost()
    vision, attention = _clip_tower(vision_model).cost(passes)
    rows = _projector_rows(model, passes, cls)
    per_row = 2.0 * linear_width(inner.multi_modal_projector)
    return VisionCost(vision, rows * per_row, passes, attention, cls, per_row)


def _image_passes(inputs: dict, patch: int, cls: bool) -> list[VitPass]:
    """LLaVA-1.5: pixel_values (N, 3, H, W), one pass per image."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return []
    return _uniform_passes(pixel_values.shape[0], _grid_patches(pixel_values, patch), cls)


def _anyres_passes(model) -> Callable[[dict, int, bool], list[VitPass]]:
    """LLaVA-NeXT / OneVision images: pixel_values (N, max tiles, 3, H, W), each image's base view and
    tiles as the model counts them (tiles that unpadding later removes still run through the tower);
    OneVision videos: pixel_values_videos (n_videos, frames, 3, H, W), one pass per frame."""
    from tokprune.patches import adapter_for

    adapter = adapter_for(model)

    def passes(inputs: dict, patch: int, cls: bool) -> list[VitPass]:
        out: list[VitPass] = []
        pixel_values, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
        if pixel_values is not None and sizes is not None:
            tiles = adapter.tower_inputs(sizes, inputs.get("batch_num_images"))
            out += _uniform_passes(sum(tiles), _grid_patches(pixel_values, patch), cls)
        videos = inputs.get("pixel_values_videos")
        if videos is not None:
            out += _uniform_passes(videos.shape[0] * videos.shape[1], _grid_patches(videos, patch), cls)
        return out

    return passes


def _llava(model, inputs: dict) -> VisionCost:
    return _llava_like(model, _image_passes, inputs)


def _anyres(model, inputs: dict) -> VisionCost:
    return _llava_like(model, _anyres_passes(model), inputs)


def _uniform_cost(
    vision_model: nn.Module, count: int, patches: int, cls: bool, rows: int, projector_width: int
) -> VisionCost:
    """`count` equal passes of `patches` patches through a CLIP-style tower; the projector maps `rows`
    rows per pass through matrices of Σ in·out = `projector_width`."""
    passes = _uniform_passes(count, patches, cls)
    vision, attention = _clip_tower(vision_model).cost(passes)
    per_row = 2.0 * projector_width
    return VisionCost(vision, count * rows * per_row, passes, attention, cls, per_row)


def _internvl(model, inputs: dict) -> VisionCost:
    """InternViT ([CLS]) per tile; the projector maps the P·ratio² pixel-shuffled tokens of each tile."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return VisionCost()
    inner = model.model
    patches = _grid_patches(pixel_values, _patch_size(model.config.vision_config))
    rows = int(patches * model.config.downsample_ratio**2)
    width = linear_width(inner.multi_modal_projector)
    return _uniform_cost(inner.vision_tower, pixel_values.shape[0], patches, True, rows, width)


def _smolvlm(model, inputs: dict) -> VisionCost:
    """SigLIP per real frame (all-zero padding frames are dropped, by the model's rule); the connector
    maps the P/s² pixel-shuffled tokens of each frame."""
    from tokprune.patches.smolvlm import real_frames

    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return VisionCost()
    inner = model.model
    patches = _grid_patches(pixel_values, _patch_size(model.config.vision_config))
    frames = int(real_frames(pixel_values).sum()) if pixel_values.dim() == 5 else pixel_values.shape[0]
    rows = patches // int(model.config.scale_factor) ** 2
    return _uniform_cost(inner.vision_model, frames, patches, False, rows, linear_width(inner.connector))


def _gemma3(model, inputs: dict) -> VisionCost:
    """SigLIP per image; the projector average-pools to mm_tokens_per_image tokens (not a matmul) and
    multiplies them by its (C, d) input projection."""
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return VisionCost()
    inner = model.model
    projector = inner.multi_modal_projector
    patches = _grid_patches(pixel_values, _patch_size(model.config.vision_config))
    width = projector.mm_input_projection_weight.numel() + linear_width(projector)  # (C, d) matrix
    rows = int(model.config.mm_tokens_per_image)
    return _uniform_cost(
        _vision_model(inner.vision_tower), pixel_values.shape[0], patches, False, rows, width
    )


# ---- Qwen2-VL, Qwen2.5-VL, Qwen3-VL: images and videos through one windowed / framed ViT
def _qwen_windows(model, grid: torch.Tensor) -> list[int]:
    from transformers.vision_utils import get_vision_window_index

    vc = model.config.vision_config
    _, cu = get_vision_window_index(
        grid, spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size, patch_size=vc.patch_size
    )
    return [int(s) for s in (cu[1:] - cu[:-1]).tolist()]


def _qwen_passes(model, grid: torch.Tensor | None, windowed: bool) -> list[VitPass]:
    """One pass per image / clip of grid (t, h, w): t frames of h·w patches (its full-attention blocks)."""
    if grid is None:
        return []
    passes = []
    for row in grid:
        t, h, w = (int(v) for v in row.tolist())
        windows = _qwen_windows(model, row[None]) if windowed else None
        passes.append(VitPass(tokens=t * h * w, patches=t * h * w, blocks=[h * w] * t, windows=windows))
    return passes


def _qwen(model, inputs: dict) -> VisionCost:
    visual = model.model.visual
    vc = model.config.vision_config
    windowed_blocks = set(range(len(visual.blocks))) - set(getattr(vc, "fullatt_block_indexes", None) or [])
    windowed = bool(getattr(vc, "fullatt_block_indexes", None)) and bool(windowed_blocks)
    passes = []
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if inputs.get(pixels) is not None:
            passes += _qwen_passes(model, inputs.get(grid), windowed)
    if not passes:
        return VisionCost()
    windowed_layers = frozenset(windowed_blocks) if windowed else frozenset()
    tower = Tower(layers=list(visual.blocks), patch_embed=visual.patch_embed, windowed=windowed_layers)
    vision, attention = tower.cost(passes)
    unit = vc.spatial_merge_size**2
    rows = sum(p.tokens for p in passes) // unit
    mergers = [visual.merger, *getattr(visual, "deepstack_merger_list", [])]
    projector = 2.0 * rows * sum(linear_width(m) for m in mergers)
    from tokprune.patches import adapter_for

    # a merged row goes through the main merger again (not the deepstack ones)
    return VisionCost(
        vision, projector, passes, attention, False, 2.0 * linear_width(visual.merger),
        depth=len(visual.blocks), windowed=windowed_layers, feature_layer=adapter_for(model).score_layer,
    )  # fmt: skip


# model_type -> the vision-side cost of one prefill's inputs
FAMILIES: dict[str, Callable[[nn.Module, dict], VisionCost]] = {
    "llava": _llava,
    "llava_next": _anyres,
    "llava_onevision": _anyres,
    "qwen2_vl": _qwen,
    "qwen2_5_vl": _qwen,
    "qwen3_vl": _qwen,
    "qwen3_vl_moe": _qwen,
    "internvl": _internvl,
    "smolvlm": _smolvlm,
    "idefics3": _smolvlm,
    "gemma3": _gemma3,
}


def vision_cost(model, inputs: dict) -> VisionCost:
    """Vision tower + projector FLOPs of `model(**inputs)` (0 without pixels)."""
    return FAMILIES[model.config.model_type](model, inputs)
