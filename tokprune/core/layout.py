"""Per-forward facts an adapter hands to the engine: the image layout and the ViT-side signals."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
