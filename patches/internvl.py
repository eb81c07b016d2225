"""InternVL (InternVLForConditionalGeneration): InternViT tiles with a [CLS] token, pixel shuffle, Qwen2 LLM.

The processor cuts an image into 1..max_patches square tiles and, when there is more than one, appends a
thumbnail (the whole image resized to one tile). The prompt holds, per image,
`<img>` + `<IMG_CONTEXT>` x (tiles x tokens per tile) + `</img>`, and the model scatters the features of
all tiles, in pixel_values order, into the `<IMG_CONTEXT>` positions (`config.image_token_id`). Every
tile runs through InternViT (its [CLS] is dropped by the 'default' strategy), then `pixel_shuffle`
(downsample_ratio 0.5: a 2x2 block of patches becomes one token) and the projector.

Layout rules:
  * an image is one contiguous run of image tokens in the prompt (the processor brackets every image
    with `<img>` ... `</img>`, so two images never touch); its tiles are consecutive blocks of
    tokens-per-tile; with more than one tile the last is the thumbnail (unit kind "base"), the others are
    "tile" units; every unit is a full (h, w) grid of merged tokens; a one-tile image is a plain grid;
  * the budget is per image, over all its tiles (spatial methods split it over the tiles by size);
    video frames (one `<img>...</img>` of one tile each) are images.
Signals: at the feature layer (`vision_feature_layer`, -1 = the last layer) of every tile: the [CLS]
attention row, the attention each patch receives, the keys, the pre-softmax logit signals (the [CLS]
query's logits, PruMerge's concatenated-head [CLS] attention, the logit means over the patches; after the
layer's q/k norms); each pooled (mean) over the patches that the pixel shuffle merges into one LLM token,
found by replaying the model's own `pixel_shuffle` on indices.
Features before the projector: "features" = the projector's input (pixel-shuffled tiles, one row of
r * C = 4C per LLM token, in tile order = the LLM's), `project` = the projector (layer norm, MLP);
"vit_cls" = every tile's [CLS] at the feature layer, r copies side by side (the pixel shuffle of a block
that is all [CLS]), on every token of its tile.
"""

from __future__ import annotations

import torch
from torch import nn

from tokprune.core.layout import Unit
from tokprune.core.timing import timed
from tokprune.errors import UnsupportedInputError, UnsupportedModelError
from tokprune.signals import vit_signal

from .base import Adapter, ImageLayout, ProjectionTap, VisionSignalStore
from .llava import feature_layer_index


def visual_runs(visual: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, length) of every maximal run of True in visual (B, L), row by row, left to right
    (the order masked_scatter fills the image positions in)."""
    runs = []
    for row, line in enumerate(visual.bool()):
        padded = torch.cat([line.new_zeros(1), line, line.new_zeros(1)]).long()
        edges = padded[1:] - padded[:-1]  # +1 where a run starts, -1 one past where it ends
        starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
        runs += [(row, int(s), int(e - s)) for s, e in zip(starts, ends)]
    return runs


def tile_units(n_tiles: int, tile_tokens: int, grid: tuple[int, int], last_kind: str) -> list[Unit]:
    """Units of an image made of `n_tiles` consecutive equal tiles; the last one gets `last_kind`."""
    return [
        Unit(
            index=torch.arange(t * tile_tokens, (t + 1) * tile_tokens),
            grid=grid,
            kind=last_kind if t == n_tiles - 1 else "tile",
        )
        for t in range(n_tiles)
    ]


def pool_groups(value: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean over merged patches. value: (n, P) or (n, P, d) per patch; groups: (G, r) patch indices of
    every merged token -> (n * G) or (n * G, d)."""
    pooled = value[:, groups.to(value.device)].float().mean(2)  # (n, G) or (n, G, d)
    return pooled.flatten(0, 1)


class InternVLAdapter(Adapter):
    model_classes = ("InternVLForConditionalGeneration",)
    family = "internvl"
    feature_signals = ("features", "vit_cls")
    frames_as_images = True  # InternVLProcessor turns a video into one-tile images ("Frame1: <img>...</img>")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                "InternVL with vision_feature_select_strategy='full' is not supported: the model cannot "
                "pixel-shuffle a [CLS] token into its grid; use the 'default' strategy"
            )
        self.vision_layers: nn.ModuleList = self.inner.vision_tower.encoder.layer
        self.score_layer = feature_layer_index(cfg.vision_feature_layer, len(self.vision_layers))
        self.ratio = float(cfg.downsample_ratio)
        patch = cfg.vision_config.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
        self._groups: dict[int, torch.Tensor] = {}  # patches per tile side -> (G, r) merged patch indices
        self.last_feature_layer = cfg.vision_feature_layer == -1  # the model takes last_hidden_state then

    # ---- pixel shuffle replay -------------------------------------------------------------------
    def merge_groups(self, side: int) -> torch.Tensor:
        """(G, r): for each LLM token of a tile of side x side patches (row-major), the indices of the
        r = 1 / ratio^2 patches that the model's own `pixel_shuffle` merges into it, in LLM order."""
        if side not in self._groups:
            index = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
            merged = self.inner.pixel_shuffle(index, scale_factor=self.ratio)  # (1, h, w, r)
            self._groups[side] = merged.reshape(-1, merged.shape[-1]).round().long()
        return self._groups[side]

    def merged_side(self, side: int) -> int:
        """Merged tokens per side of a tile of `side` patches per side."""
        return int(side * self.ratio)

    # ---- layout ----------------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        pixel_values = inner_kwargs.get("pixel_values")
        encoded = encoded_images(inner_kwargs)
        if pixel_values is None and encoded is None:
            return None
        input_ids = inner_kwargs.get("input_ids")
        if input_ids is None:
            raise UnsupportedInputError(
                "tokprune needs input_ids (as a keyword, not only inputs_embeds) to find the image tokens"
            )
        if pixel_values is not None:
            side = self.merged_side(pixel_values.shape[-1] // self.patch_size)
            n_tiles = pixel_values.shape[0]
        else:
            features = getattr(encoded, "pooler_output", encoded)  # (n_tiles, G, D)
            side, n_tiles = round(features.shape[1] ** 0.5), None
        layout = self.layout_from_ids(input_ids, side)
        if n_tiles is not None and sum(layout.counts) != n_tiles * side * side:
            raise UnsupportedInputError(
                f"the prompt holds {sum(layout.counts)} image tokens but {n_tiles} tiles give "
                f"{n_tiles * side * side}: expand every image with the processor"
            )
        return layout

    def layout_from_ids(self, input_ids: torch.Tensor, side: int) -> ImageLayout:
        """Images = runs of image tokens; tiles = blocks of side * side tokens; thumbnail last."""
        tile_tokens = side * side
        layout = ImageLayout(counts=[], grids=[], units=[])
        for _, _, length in visual_runs(self.visual_mask(input_ids)):
            if length % tile_tokens:
                raise UnsupportedInputError(
                    f"an image holds {length} image tokens, not a multiple of {tile_tokens} per tile: "
                    "expand every image with the processor"
                )
            n_tiles = length // tile_tokens
            layout.counts.append(length)
            layout.grids.append((side, side) if n_tiles == 1 else None)
            layout.units.append(
                tile_units(n_tiles, tile_tokens, (side, side), "base") if n_tiles > 1 else None
            )
        return layout

    # ---- vision signals --------------------------------------------------------------------------
    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.vision_layers), self.score_layer)
        return self.hook_attention_layers(
            by_layer,
            self.vision_layers,
            lambda wanted, tap: self._hook(wanted, store, tap),
            attention="attention",
        )

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore, tap: ProjectionTap):
        """Forward hook on one InternViT attention module computing `wanted` ({full name: base name}) per
        LLM token: per tile, the value of every patch ([CLS] dropped), pooled over the merged patches; from
        the projections its forward made (`tap`)."""

        def hook(module, args, kwargs, output):
            with timed(store.seconds, output[0].device), tap:
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (n_tiles, 1 + P, C), normed
                n, length, _ = hidden.shape
                shape = (n, -1, module.num_heads, module.head_dim)
                projected = tap.output("k_proj", hidden)  # the layer's own k projection
                keys = module.k_norm(projected).view(shape).transpose(1, 2)  # (n, H, 1 + P, d)
                groups = self.merge_groups(round((length - 1) ** 0.5))
                queries = lambda: module.q_norm(tap.output("q_proj", hidden)).view(shape).transpose(1, 2)  # noqa: E731
                for name, base in wanted.items():
                    value = vit_signal(base, queries, keys, module.scale, True)  # (n, 1 + P, ...)
                    store.values[name] = pool_groups(value[:, 1:], groups)

        return hook

    # ---- features before the projector -------------------------------------------------------------
    def install_feature_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """ "features": the projector's input, the pixel-shuffled tiles (n_tiles, G, r * C) flattened to one
        row per LLM token; "vit_cls": every tile's [CLS] token at the feature layer (the tower's normed
        `last_hidden_state` for vision_feature_layer -1, else the output of the layer giving
        hidden_states[vision_feature_layer]) in the projector's input space: r copies side by side, what
        the pixel shuffle makes of an r-patch block that is all [CLS]; on every token of its tile."""
        handles = super().install_feature_hooks(names, store)
        if "vit_cls" not in names:
            return handles
        r = round(1 / self.ratio**2)

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (n_tiles, 1 + P, C)
            tokens = self.merge_groups(round((hidden.shape[1] - 1) ** 0.5)).shape[0]
            cls = hidden[:, :1].repeat(1, 1, r)  # (n_tiles, 1, r * C)
            store.values["vit_cls"] = cls.expand(-1, tokens, -1).flatten(0, 1)

        source = (
            self.inner.vision_tower.layernorm
            if self.last_feature_layer
            else self.vision_layers[self.score_layer]
        )
        return [*handles, source.register_forward_hook(hook)]


def encoded_images(inner_kwargs: dict):
    """The image encoder output generate() computed before the prefill (a model output, or a plain tensor
    where a model still accepts one), or None."""
    outputs = inner_kwargs.get("mm_encoder_outputs")
    return outputs.get("image") if isinstance(outputs, dict) else outputs
