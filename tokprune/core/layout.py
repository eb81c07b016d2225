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
        images_of_row, row, filled = [[] for _ in per_row], 0, 0
        for index, n in enumerate(counts):  # images fill the rows in order
            while per_row[row] - filled <= 0:
                row, filled = row + 1, 0
            images_of_row[row].append(index)
            filled += n
        grids, start = [], 0
        for row in range(0, len(per_row), expand):
            originals = range(start, start + len(images_of_row[row]))
            grids += [self.grids[i] for i in originals] * expand
            start += len(images_of_row[row])
        return ImageLayout(counts=list(counts), grids=grids)


class VisionSignalStore:
    """Per-forward store of ViT-side signals, one flat tensor per name in global visual-token order."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.seconds = [0.0]

    def clear(self) -> None:
        self.values.clear()
        self.seconds = [0.0]
