"""What every model-family adapter provides to the engine.

An adapter knows where things are in one family of models (vision tower, its attention layers, the
language model and its decoder layers), how the visual tokens of a prompt split into images and grids,
and how to compute ViT-side signals in hooks. It never knows which method runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class ImageLayout:
    """How the visual tokens of one forward split into images, in the order masked_scatter fills them.

    counts: tokens per image (global order over the batch, row-major).
    grids: (h, w) token grid of each image, or None where the tokens are not a plain grid.
    """

    counts: list[int] = field(default_factory=list)
    grids: list[tuple[int, int] | None] = field(default_factory=list)


class VisionSignalStore:
    """Per-forward store of ViT-side signals, one flat tensor per name in global visual-token order."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.seconds = [0.0]

    def clear(self) -> None:
        self.values.clear()
        self.seconds = [0.0]


class Adapter:
    """Base adapter. Subclasses set `model_classes` and implement the abstract methods."""

    model_classes: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    # signals a ViT hook of this family can produce
    vision_signals: ClassVar[tuple[str, ...]] = ("cls_attention", "vit_keys")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner: nn.Module = model.model

    # ---- where things are -------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def text_config(self):
        return self.language_model.config

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    # ---- per-forward facts ------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        """Images of this forward from the inner model's kwargs; None when there are no images."""
        raise NotImplementedError

    @staticmethod
    def precomputed_counts(inner_kwargs: dict) -> list[int] | None:
        """Tokens per image when generate() passes precomputed `mm_encoder_outputs` instead of pixels."""
        outputs = (inner_kwargs.get("mm_encoder_outputs") or {}).get("image")
        if outputs is None:
            return None
        return [int(features.shape[0]) for features in outputs.pooler_output]

    def position_rows(self) -> int:
        """1 for (B, L) position ids, 3 for Qwen's M-RoPE (3, B, L)."""
        return 1

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """Hooks that fill `store` with the requested ViT signals during the vision forward."""
        raise NotImplementedError
