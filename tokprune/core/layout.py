"""Per-forward facts an adapter hands to the engine: the image layout and the ViT-side signals."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokprune.errors import UnsupportedInputError

# one visual item of a forward: (kind, index among the items of its kind), e.g. ("video", 0)
Item = tuple[str, int]


@dataclass
class Unit:
    """One spatial unit of an image: an AnyRes tile (or its base/thumbnail view), a video frame.

    index: (m,) ascending local positions of the unit's tokens among its image's tokens.
    grid: (h, w) with h * w == m, row-major over `index`; None if the tokens are not a full grid.
    kind: "base" (the downscaled whole image of AnyRes), "tile" (a high-resolution crop) or "frame".
    """

    index: torch.Tensor
    grid: tuple[int, int] | None
    kind: str = "tile"


@dataclass
class ImageLayout:
    """How the visual tokens of one forward split into images, in the order masked_scatter fills them.

    counts: tokens per image (global order over the batch, row-major).
    grids: (h, w) token grid of each image, or None where the tokens are not a plain grid.
    units: per image, its spatial units (AnyRes base + tiles, video frames), or None for a plain image.
    separators: per image, (n,) bool of tokens that carry no image content (LLaVA-NeXT's row-end
        `image_newline`), or None. Rule: separators never compete for the budget (the budget counts the
        content tokens); an image that loses any token loses all its separators, since a pruned grid has
        no rows left to end; an image kept whole keeps them.
    """

    counts: list[int] = field(default_factory=list)
    grids: list[tuple[int, int] | None] = field(default_factory=list)
    units: list[list[Unit] | None] | None = None
    separators: list[torch.Tensor | None] | None = None

    def units_of(self, image: int) -> list[Unit] | None:
        return self.units[image] if self.units is not None else None

    def separators_of(self, image: int) -> torch.Tensor | None:
        return self.separators[image] if self.separators is not None else None

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
        source, start = [], 0  # original image of every expanded image
        for row in range(0, len(per_row), expand):
            n_images = rows.count(row)  # images of original row row // expand
            source += list(range(start, start + n_images)) * expand
            start += n_images
        pick = lambda values: None if values is None else [values[i] for i in source]  # noqa: E731
        return ImageLayout(
            counts=list(counts),
            grids=pick(self.grids),
            units=pick(self.units),
            separators=pick(self.separators),
        )


class VisionSignalStore:
    """Per-forward store of ViT-side signals, one flat tensor per name in global visual-token order."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.seconds = [0.0]

    def clear(self) -> None:
        self.values.clear()
        self.seconds = [0.0]


def runs_vision_tower(kwargs: dict) -> bool:
    """The (inner) model will encode pixels itself in the forward (or generate() call) given `kwargs`."""
    return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None


def brings_images(kwargs: dict) -> bool:
    """Pixels, or the image features generate() encoded before calling the model."""
    return runs_vision_tower(kwargs) or bool(kwargs.get("mm_encoder_outputs"))


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


def sequence_order(masks: dict[str, torch.Tensor], counts: dict[str, list[int]]) -> list[Item]:
    """The visual items of a batch in the order their tokens appear (rows in order, left to right).

    masks: kind -> (B, L) bool placeholders of that kind; counts: tokens of every item of a kind, in the
    order transformers scatters that kind's features (row-major over its own placeholders). An item's
    tokens must be consecutive among the visual tokens of one row (text may separate them, as Qwen3-VL's
    frame timestamps do). Placeholders of a kind without items are ignored.
    """
    kinds = [kind for kind in counts if counts[kind]]
    if not kinds:
        return []
    codes = torch.full(masks[kinds[0]].shape, -1, dtype=torch.long)  # on the CPU: read item by item
    for code, kind in enumerate(kinds):
        codes[masks[kind].cpu()] = code
    rows = torch.arange(codes.shape[0])[:, None].expand_as(codes)
    flat, flat_rows = codes[codes >= 0], rows[codes >= 0]  # every visual token, row-major
    items: list[Item] = []
    used = dict.fromkeys(kinds, 0)
    pos = 0
    while pos < flat.numel():
        kind = kinds[int(flat[pos])]
        if used[kind] == len(counts[kind]):
            raise UnsupportedInputError(f"the prompt holds more {kind} tokens than its {kind}s give features")
        n = counts[kind][used[kind]]
        span = slice(pos, pos + n)
        if flat[span].numel() != n or bool(
            (flat[span] != flat[pos]).any() or (flat_rows[span] != flat_rows[pos]).any()
        ):
            raise UnsupportedInputError(
                f"{kind} {used[kind]} needs {n} consecutive {kind} tokens in one row of the prompt; they are "
                "interleaved with another image or video, or cut by the row end or the prompt end"
            )
        items.append((kind, used[kind]))
        used[kind] += 1
        pos += n
    missing = [kind for kind in kinds if used[kind] != len(counts[kind])]
    if missing:
        raise UnsupportedInputError(
            f"the prompt holds fewer {missing[0]} tokens than its {missing[0]}s give features"
        )
    return items


def in_sequence_order(masks: dict[str, torch.Tensor], parts: dict[str, ImageLayout]) -> ImageLayout:
    """One layout of several kinds of media, ordered by their first token in the sequence.

    masks: kind -> (B, L) bool placeholders of that kind; parts: kind -> its layout in the order the model
    scatters that kind's features. Every item must occupy consecutive visual tokens of one row.
    """
    items = sequence_order(masks, {kind: layout.counts for kind, layout in parts.items()})
    merged = ImageLayout(counts=[], grids=[], units=[], separators=[])
    for kind, item in items:
        layout = parts[kind]
        merged.counts.append(layout.counts[item])
        merged.grids.append(layout.grids[item])
        merged.units.append(layout.units_of(item))
        merged.separators.append(layout.separators_of(item))
    return merged
