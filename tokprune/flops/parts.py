"""FLOPs of the model's parts: one decoder layer (GQA, gated or plain MLP), the vision towers and the
projectors of the supported families. The conventions are in `tokprune.flops`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

SUPPORTED = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
CLIP_FAMILIES = ("llava", "llava_next")  # CLIP-style towers run once per image / AnyRes tile

# model_type of text configs whose decoder MLP is a plain fc1/fc2 pair (everything else is taken as gated)
_UNGATED_TEXT_MODELS = frozenset(
    {"gpt2", "opt", "phi", "gpt_neox", "gptj", "falcon", "bloom", "starcoder2", "gpt_bigcode"}
)


# --------------------------------------------------------------------------------------------- LLM
def text_dims(cfg) -> tuple[int, int, int, int, int]:
    """(d, H, H_kv, head_dim, m) of a decoder config."""
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    return d, heads, kv_heads, head_dim, cfg.intermediate_size


def _is_gated(cfg) -> bool:
    return getattr(cfg, "model_type", "") not in _UNGATED_TEXT_MODELS


def llm_layer_flops(text_config, n_query: int, n_key: int, *, gated: bool | None = None) -> float:
    """FLOPs of one decoder layer: n_query new tokens, each attending to n_key keys (all heads).

    q/k/v/o projections with GQA (num_key_value_heads, head_dim), Q Kᵀ and A V over n_key keys, and the
    MLP: gated (SwiGLU, 3 matrices) or 2 matrices. `gated=None` infers it from the config's model_type
    (Llama, Qwen2, Mistral, Gemma, … are gated); `prefill_flops` passes what the module really has.
    """
    d, heads, kv_heads, head_dim, m = text_dims(text_config)
    if gated is None:
        gated = _is_gated(text_config)
    nq, nk = int(n_query), int(n_key)
    if nq <= 0:
        return 0.0
    proj = (
        2 * nq * d * heads * head_dim + 2 * 2 * nq * d * kv_heads * head_dim + 2 * nq * heads * head_dim * d
    )
    attention = 2 * 2 * heads * nq * nk * head_dim
    mlp = 2 * nq * d * m * (3 if gated else 2)
    return float(proj + attention + mlp)


def model_family(model) -> str:
    family = getattr(model.config, "model_type", "")
    if family not in SUPPORTED:
        raise TypeError(
            f"flops: unsupported model {type(model).__name__} (model_type {family!r}); supported: {SUPPORTED}"
        )
    return family


def llm_gated(model) -> bool:
    layers = getattr(getattr(getattr(model, "model", None), "language_model", None), "layers", None)
    if layers is not None and len(layers):
        return hasattr(layers[0].mlp, "gate_proj")
    return _is_gated(model.config.text_config)


def vocab_size(model) -> int:
    head = getattr(model, "lm_head", None)
    return int(getattr(head, "out_features", 0) or model.config.text_config.vocab_size)


# --------------------------------------------------------------------------------------------- vision
@dataclass
class Images:
    """Per vision pass (an image; an AnyRes tile): ViT tokens (incl. [CLS]) and the attention-block sizes of
    full blocks; per image: its LLM tokens; per vision pass: the tokens the projector maps (None: as
    `llm_tokens`)."""

    vit_tokens: list[int]
    full_blocks: list[list[int]]  # per vision pass, the attention blocks of a full-attention layer
    llm_tokens: list[int]
    projector_tokens: list[int] | None = None


def _llava_images(model, inputs: dict) -> Images:
    pixel_values = inputs.get("pixel_values")
    if pixel_values is None:
        return Images([], [], [])
    p = model.config.vision_config.patch_size
    n_images, _, height, width = pixel_values.shape
    patches = (height // p) * (width // p)
    full = model.config.vision_feature_select_strategy == "full"
    n = patches + 1
    return Images([n] * n_images, [[n]] * n_images, [patches + int(full)] * n_images)


def _qwen_images(model, inputs: dict) -> Images:
    grid = inputs.get("image_grid_thw")
    if grid is None or inputs.get("pixel_values") is None:
        return Images([], [], [])
    unit = model.config.vision_config.spatial_merge_size**2
    vit, blocks, llm = [], [], []
    for t, h, w in grid.tolist():
        vit.append(t * h * w)
        blocks.append([h * w] * t)
        llm.append(t * h * w // unit)
    return Images(vit, blocks, llm)


def _llava_next_images(model, inputs: dict) -> Images:
    """One ViT pass per AnyRes tile (base view included); LLM tokens = the packed image (newlines too)."""
    sizes = inputs.get("image_sizes")
    if inputs.get("pixel_values") is None or sizes is None:
        return Images([], [], [])
    from tokprune.patches import adapter_for

    layout, _ = adapter_for(model).packing(sizes)
    tiles = sum(_tiles_per_image(model, sizes))  # tiles wholly unpadded away still run through the tower
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    return Images([n] * tiles, [[n]] * tiles, list(layout.counts), [n - 1] * tiles)


def _tiles_per_image(model, sizes) -> list[int]:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = model.config
    return [
        image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes
    ]


def images_of(model, inputs: dict) -> Images:
    family = model_family(model)
    if family == "llava":
        return _llava_images(model, inputs)
    if family == "llava_next":
        return _llava_next_images(model, inputs)
    return _qwen_images(model, inputs)


def _vit_attention(width: int, blocks: Iterable[int]) -> float:
    """Q Kᵀ and A V within each attention block (all heads together have `width` channels)."""
    return float(sum(2 * 2 * n * n * width for n in blocks))


def llava_vision(model, images: Images) -> tuple[float, float]:
    vc = model.config.vision_config
    c, m, p = vc.hidden_size, vc.intermediate_size, vc.patch_size
    channels = getattr(vc, "num_channels", 3)
    layers = vc.num_hidden_layers
    fl = model.config.vision_feature_layer
    n_feature = len(fl) if isinstance(fl, (list, tuple)) else 1
    d = model.config.text_config.hidden_size
    vision = projector = 0.0
    for n in images.vit_tokens:
        patches = n - 1
        vision += 2 * patches * c * channels * p * p
        vision += layers * (8 * n * c * c + 2 * 2 * n * n * c + 2 * 2 * n * c * m)
    for rows in images.projector_tokens if images.projector_tokens is not None else images.llm_tokens:
        projector += 2 * rows * (c * n_feature * d + d * d)
    return vision, projector


def _qwen_windows(model, grid: torch.Tensor) -> list[int]:
    from transformers.vision_utils import get_vision_window_index

    vc = model.config.vision_config
    _, cu = get_vision_window_index(
        grid, spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size, patch_size=vc.patch_size
    )
    return [int(s) for s in (cu[1:] - cu[:-1]).tolist()]


def qwen_vision(model, inputs: dict, images: Images) -> tuple[float, float]:
    vc = model.config.vision_config
    family = model_family(model)
    if family == "qwen2_vl":
        c, out = vc.embed_dim, vc.hidden_size
        mlp = 2 * 2 * c * int(c * vc.mlp_ratio)  # per patch
        windowed = set()
        windows: list[int] = []
    else:
        c, out = vc.hidden_size, vc.out_hidden_size
        mlp = 2 * 3 * c * vc.intermediate_size
        windowed = set(range(vc.depth)) - set(vc.fullatt_block_indexes)
        windows = _qwen_windows(model, inputs["image_grid_thw"]) if windowed and images.vit_tokens else []
    s = sum(images.vit_tokens)
    unit = vc.spatial_merge_size**2
    volume = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    full_blocks = [n for blocks in images.full_blocks for n in blocks]
    vision = 2.0 * s * c * volume
    for block in range(vc.depth):
        vision += 8 * s * c * c + s * mlp
        vision += _vit_attention(c, windows if block in windowed else full_blocks)
    rows = s // unit
    projector = 2.0 * rows * (unit * c) * (unit * c) + 2.0 * rows * (unit * c) * out
    return vision, projector
