"""LLaVA-NeXT (LlavaNextForConditionalGeneration): AnyRes tiles of a CLIP ViT, unpadded, with row-end tokens.

Each image is cut into a base view (the whole image resized to one tile) and a grid of high-resolution
tiles; the ViT runs on every tile (one [CLS] each, dropped), and `pack_image_features` lays the LLM tokens
out as [base 24x24 | big tile grid, unpadded to the image's aspect ratio, with an `image_newline` token
after every row]. The adapter replays that packing on token indices, so the ViT signals (computed per
tile, as on LLaVA-1.5) follow the exact LLM order, and it describes every image as units (base + one per
tile, each a full grid) with the newline tokens as separators (see `core.layout.ImageLayout`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tokprune.core.layout import Unit
from tokprune.errors import UnsupportedInputError, UnsupportedModelError

from .base import ImageLayout, InstanceWrap, VisionSignalStore
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    model_classes = ("LlavaNextForConditionalGeneration",)
    family = "llava_next"
    tiles = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.keeps_cls:
            raise UnsupportedModelError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' on a tower with a [CLS] token is not "
                "supported: its [CLS] tokens would sit inside the tile grids; use the 'default' strategy"
            )
        side = model.config.vision_config.image_size // self.patch_size
        self.tile_tokens = side * side
        self._latest: tuple[ImageLayout, torch.Tensor] | None = None  # of the latest get_image_features

    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        image_sizes = inner_kwargs.get("image_sizes")
        if inner_kwargs.get("pixel_values") is not None:
            if image_sizes is None:
                raise UnsupportedInputError(
                    "LLaVA-NeXT needs image_sizes with pixel_values: pass the image_sizes the processor returns"
                )
            return self.packing(image_sizes)[0]
        counts = self.precomputed_counts(inner_kwargs)
        if counts is None:
            return None
        if self._latest is None:
            raise UnsupportedInputError(
                "precomputed LLaVA-NeXT image features without their image_sizes: tokprune saw no "
                "get_image_features call since apply(); pass pixel_values and image_sizes"
            )
        layout = self._latest[0]
        if counts != layout.counts:  # generate() repeated rows (beams, num_return_sequences)
            layout = layout.expanded(self.visual_mask(inner_kwargs["input_ids"]), counts)
        return layout

    def tower_inputs(self, image_sizes: torch.Tensor, batch_num_images=None) -> list[int]:
        """Tower inputs per image (base view + tiles, also tiles that unpadding removes later), as the model
        counts them in get_image_features. batch_num_images: unused (LLaVA-OneVision's signature)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            for size in image_sizes
        ]

    def packing(self, image_sizes: torch.Tensor) -> tuple[ImageLayout, torch.Tensor]:
        """(layout of the packed images, source (N_visual,) long: for every LLM visual token the index of
        its ViT patch token in the tower's flat per-tile order, -1 for newline tokens)."""
        tiles = self.tower_inputs(image_sizes)
        flat = torch.arange(sum(tiles) * self.tile_tokens, dtype=torch.float32)
        per_image = torch.split(flat.view(-1, self.tile_tokens, 1), tiles)
        packed, _ = self.inner.pack_image_features(
            list(per_image), image_sizes, "default", image_newline=torch.full((1,), -1.0)
        )
        sources = [p.squeeze(-1).round().long() for p in packed]
        layout = ImageLayout(counts=[s.numel() for s in sources], grids=[], units=[], separators=[])
        offset = 0
        for source, n_tiles in zip(sources, tiles):
            units = self._units(source, offset, n_tiles)
            layout.units.append(units)
            layout.grids.append(units[0].grid if len(units) == 1 else None)
            layout.separators.append(source < 0)
            offset += n_tiles * self.tile_tokens
        return layout, torch.cat(sources)

    def _units(self, source: torch.Tensor, offset: int, n_tiles: int) -> list[Unit]:
        """Base view + every high-resolution tile of one image, each the grid of its surviving tokens."""
        side = round(self.tile_tokens**0.5)
        local = source - offset
        units = []
        for tile in range(n_tiles):
            index = ((local >= tile * self.tile_tokens) & (local < (tile + 1) * self.tile_tokens)).nonzero()
            index = index.squeeze(1)
            if index.numel() == 0:  # the tile lies wholly in the unpadded margin
                continue
            patch = local[index] % self.tile_tokens
            rows, cols = (patch // side).unique().numel(), (patch % side).unique().numel()
            grid = (rows, cols) if rows * cols == index.numel() else None
            units.append(Unit(index=index, grid=grid, kind="base" if tile == 0 and n_tiles > 1 else "tile"))
        return units

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        handles = super().install_vision_hooks(names, store)
        return [_wrap_image_features(self, store), *handles]


def _wrap_image_features(adapter: LlavaNextAdapter, store: VisionSignalStore) -> InstanceWrap:
    """After every vision pass, put the per-tile ViT signals in the packed LLM order (newlines get 0)."""
    original = adapter.inner.get_image_features

    @functools.wraps(original)  # generate() inspects the signature to pre-encode images
    def get_image_features(*args, **kwargs):
        image_sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        store.clear()
        out = original(*args, **kwargs)
        layout, source = adapter.packing(image_sizes)
        adapter._latest = (layout, source)
        for name, value in store.values.items():
            gathered = value[source.clamp(min=0).to(value.device)]
            gathered[source < 0] = 0
            store.values[name] = gathered
        return out

    return InstanceWrap(adapter.inner, "get_image_features", get_image_features)
