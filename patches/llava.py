"""LLaVA-1.5 (LlavaForConditionalGeneration): CLIP-style ViT with a [CLS] token, Llama-style LLM."""

from __future__ import annotations

import torch
from torch import nn

from tokprune.core.timing import timed
from tokprune.signals import cls_attention, received_attention

from .base import Adapter, ImageLayout, ProjectionTap, VisionSignalStore


def clip_encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """encoder.layers of a CLIP/SigLIP vision model (flat in transformers 5, nested in older wrappers)."""
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        encoder = getattr(owner, "encoder", None) if owner is not None else None
        if encoder is not None and hasattr(encoder, "layers"):
            return encoder.layers
    raise TypeError(f"cannot find encoder.layers in vision tower {type(vision_tower).__name__}")


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Index into encoder.layers of the layer whose *output* is hidden_states[vision_feature_layer].

    hidden_states[0] is the embedding output, hidden_states[i] the output of layers[i - 1]; with several
    feature layers the deepest one is used.
    """
    fl = (
        max(vision_feature_layer, key=lambda i: i % (num_layers + 1))
        if isinstance(vision_feature_layer, (list, tuple))
        else vision_feature_layer
    )
    index = fl % (num_layers + 1) - 1
    if index < 0:
        raise ValueError(
            "vision_feature_layer selects the patch embeddings; there is no attention to score with"
        )
    return index


class LlavaAdapter(Adapter):
    """Images are square crops of a CLIP ViT; each yields h*w patch tokens (+ [CLS] with strategy 'full')."""

    model_classes = ("LlavaForConditionalGeneration",)
    family = "llava"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.vision_layers = clip_encoder_layers(self.inner.vision_tower)
        self.score_layer = feature_layer_index(cfg.vision_feature_layer, len(self.vision_layers))
        self.keeps_cls = cfg.vision_feature_select_strategy == "full"
        self.patch_size = cfg.vision_config.patch_size

    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        pixel_values = inner_kwargs.get("pixel_values")
        if inner_kwargs.get("image_sizes") is not None:
            raise NotImplementedError(
                "LLaVA with image_sizes (Pixtral-style variable sizes) is not supported yet"
            )
        if pixel_values is not None:
            n_images, _, height, width = pixel_values.shape
            h, w = height // self.patch_size, width // self.patch_size
            return ImageLayout(
                counts=[h * w + int(self.keeps_cls)] * n_images, grids=[self._grid(h * w)] * n_images
            )
        counts = self.precomputed_counts(inner_kwargs)
        if counts is None:
            return None
        return ImageLayout(counts=counts, grids=[self._grid(n - int(self.keeps_cls)) for n in counts])

    def _grid(self, n_patches: int) -> tuple[int, int] | None:
        """Square patch grid of a CLIP crop; None when [CLS] is among the features."""
        side = round(n_patches**0.5)
        return None if self.keeps_cls or side * side != n_patches else (side, side)

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.vision_layers), self.score_layer)
        return self.hook_attention_layers(
            by_layer, self.vision_layers, lambda wanted, tap: self._hook(wanted, store, tap)
        )

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore, tap: ProjectionTap):
        """Forward hook on one CLIP attention module computing `wanted` ({full name: base name}) from the
        projections its forward made (`tap`)."""
        first = 0 if self.keeps_cls else 1

        def hook(module, args, kwargs, output):
            with timed(store.seconds, output[0].device), tap:
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (n_img, 1 + P, C), normed
                n_img, length, _ = hidden.shape
                heads = (n_img, length, -1, module.head_dim)
                keys = tap.output("k_proj", hidden).view(heads).transpose(1, 2)  # (n_img, H, 1 + P, d)
                for name, base in wanted.items():
                    if base == "cls_attention":
                        queries = tap.output("q_proj", hidden).view(heads).transpose(1, 2)
                        value = cls_attention(queries[:, :, :1], keys, module.scale)  # (n_img, 1 + P)
                    elif base == "received_attention":
                        queries = tap.output("q_proj", hidden).view(heads).transpose(1, 2)
                        value = torch.stack(
                            [received_attention(q, k, module.scale) for q, k in zip(queries, keys)]
                        )
                    else:  # vit_keys: head mean
                        value = keys.float().mean(1)
                    store.values[name] = value[:, first:].flatten(0, 1)

        return hook
