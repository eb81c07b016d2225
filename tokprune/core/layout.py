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

    def expanded(self, visual: torch.Tensor, counts: list[int]) -> ImageLayout:
        """This layout after generate() repeated every batch row e times (num_beams, num_return_sequences).

        visual: (B * e, L) image-token positions of the expanded batch; counts: its tokens per image.
        Rows j*e .. j*e + e - 1 are copies of original row j and hold copies of its images.
        """
        per_row = visual.sum(1).tolist()
        expand = len(counts) // len(self.counts) if len(counts) % len(self.counts) == 0 else 0
        if expand < 2 or len(per_row) % expand:
            raise RuntimeError(f"{len(counts)} image features for {len(self.counts)} images")
        rows = image_rows(visual, counts)
        grids, start = [], 0
        for row in range(0, len(per_row), expand):
            n_images = rows.count(row)  # images of original row row // expand
            grids += self.grids[start : start + n_images] * expand
            start += n_images
        return ImageLayout(counts=list(counts), grids=grids)


class VisionSignalStore:
    """Per-forward store of ViT-side signals, one flat tensor per name in global visual-token order."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.seconds = [0.0]

    def clear(self) -> None:
        self.values.clear()
        self.seconds = [0.0]


def image_rows(visual: torch.Tensor, counts: list[int]) -> list[int]:
    """Batch row of every image (images fill visual positions row by row, in order)."""
    per_row = visual.sum(1).tolist()
    rows, row, filled = [], 0, 0
    for n in counts:
        while per_row[row] - filled <= 0:
            row, filled = row + 1, 0
        rows.append(row)
        filled += n
    return rows
