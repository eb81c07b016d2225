"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): AnyRes-max images and 2x2-pooled video frames of
a SigLIP tower, Qwen2 LLM.

The SigLIP tower has no [CLS] token and the checkpoints use vision_feature_select_strategy="full" (every
patch reaches the projector; "default" would drop a real patch and is rejected by `LlavaAdapter`, as is a
tower with a [CLS] under "full"). So "cls_attention" is the
attention each patch *receives* at the scoring layer (head-mean, query-mean column of the softmax map,
streamed per tile without N x N maps, `signals.received_attention`), as on Qwen; "received_attention" is
the same quantity and "vit_keys" the head-mean keys.

Images (`pack_image_features`): a single image of a prompt is cut into a base view plus a grid of tiles;
the tile grid is unpadded to the image's aspect ratio and, when it holds more than 1.1 x the
`vision_aspect_ratio` ("anyres_max_9": 9 tiles) worth of tokens, bilinearly downsampled; an
`image_newline` token ends every row. Images of a prompt with several images are one base view each
(a plain side x side grid, no units), followed by one newline. Because the packing may interpolate, token indices cannot be replayed through
it (as `llava_next` does); instead the adapter replays the model's own `pack_image_features` on the
signals themselves: a token made from several patches gets their bilinearly pooled signal, exactly as it
got their pooled features (without downsampling the packing only moves values, so signals are copied
exactly). The layout comes from replaying it on patch coordinates: units = the base view + every tile,
where an interpolated token belongs to the tile holding its sampling point (so every tile's tokens are a
rectangle of the packed grid, and the tiles a raster mosaic as on LLaVA-NeXT: `tiles = True`); newline
tokens are separators. AnyRes-only methods (HiRED, GlobalCom²) raise a ValueError on a video clip or a
base-only view, which have no tiles.

Videos (`get_video_features`): every frame goes through the tower, its patch grid is bilinearly pooled to
ceil(h/2) x ceil(w/2) (`apply_pooling`), the frames are concatenated and ONE `image_newline` token ends the
clip. Signals are pooled the same way. A clip is one entry of the layout (one "image" for the engine):
units = one Unit(kind="frame") per frame, the final newline a separator. Budget rule (`core.budget`): a
clip of t frames keeps min(k * t, t * tokens_per_frame) content tokens with `budget=k` (k per frame, the
default `video_budget="frame"`) or min(k, ...) with `video_budget="clip"`; methods that rank tokens rank
the clip at once, spatial methods share the count among the frames in proportion to their sizes (equally);
`keep_ratio=r` keeps ceil(r * t * tokens_per_frame) per clip in both modes.

Order: the model scatters all image features into the `<image>` positions, then all video features into
the `<video>` positions. `visual_mask` covers both, and `image_layout` lists images and videos in the
order of their first token in the sequence (row by row); the ViT signals (computed per kind inside
wrapped `get_image_features` / `get_video_features`, which generate() also calls before the prefill) are
put in that order by a language-model pre-hook before the engine reads them.

Features before the projector ("features"; "vit_cls" on a tower with [CLS], none on SigLIP): the projector
runs on every tower token *before* the packing, so its input rows are taken per tower token (as on
LLaVA-1.5) and packed like the signals; where the packing only moves tokens (unpadding, base views) every
LLM token is the projection of its row. Two kinds of token are not: a video frame's bilinearly pooled
tokens (`apply_pooling` after the projector) and the tokens of an AnyRes mosaic the packing bilinearly
downsamples (more than 1.1 x `vision_aspect_ratio` tiles' worth of tokens): each is a weighted mean of
projected tokens, and the MLP projector does not commute with that mean. Their feature rows are the pooled /
downsampled projector input, and a merged row of such a token is projected from it: for those tokens a
merge "before the projector" pools before projecting, where the model pools after (documented; the model's
own tokens that are not merged keep their LLM input exactly). There is no authors' code for these methods on
OneVision; `merge_space="llm"` merges the LLM input instead.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from tokprune.core.compat import cache_in
from tokprune.core.layout import Unit, in_sequence_order
from tokprune.core.selection import align_signals
from tokprune.core.timing import timed
from tokprune.errors import UnsupportedInputError, UnsupportedModelError

from .base import ImageLayout, InstanceWrap, VisionSignalStore
from .llava import LlavaAdapter

KINDS = ("image", "video")
FEATURES = ("features", "vit_cls")  # signals in the projector's input space


class LlavaOnevisionAdapter(LlavaAdapter):
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    family = "llava_onevision"
    tiles = True  # single-image prompts: base view + tile mosaic in raster order, as on LLaVA-NeXT

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if self.keeps_cls:  # a SigLIP tower with 'default' is refused by LlavaAdapter (it has no [CLS])
            raise UnsupportedModelError(
                "LLaVA-OneVision with vision_feature_select_strategy='full' on a tower with a [CLS] token is not "
                "supported: its [CLS] tokens would sit inside the tile grids; use a SigLIP tower (the checkpoints'), "
                "or the 'default' strategy"
            )
        self.side = model.config.vision_config.image_size // self.patch_size
        self.tile_tokens = self.side * self.side
        pooled = self.inner.apply_pooling(torch.zeros(1, self.tile_tokens, 1)).shape[1]
        pooled_side = math.isqrt(pooled)
        self.frame_tokens = pooled
        self.frame_grid = (pooled_side, pooled_side) if pooled_side**2 == pooled else None
        self._latest_images: ImageLayout | None = None  # of the latest get_image_features call
        self._staged: dict[str, dict[str, torch.Tensor]] = {}  # kind -> signals in that kind's scatter order
        self._input_ids: torch.Tensor | None = None  # of the latest inner forward
        self._features = False  # a "vision" method is installed: the projector's input is wanted

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: `<image>` and `<video>` placeholders."""
        return (input_ids == self.image_token_id) | (input_ids == self.video_token_id)

    def kind_masks(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": input_ids == self.image_token_id, "video": input_ids == self.video_token_id}

    # ---- layout ---------------------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        input_ids = inner_kwargs.get("input_ids")
        parts = {"image": self._images(inner_kwargs, input_ids), "video": self._videos(inner_kwargs)}
        parts = {kind: layout for kind, layout in parts.items() if layout is not None}
        if not parts:
            return None
        if input_ids is None:  # the engine rejects prompts given as embeddings only
            return next(iter(parts.values()))
        return in_sequence_order(self.kind_masks(input_ids), parts)

    def _images(self, inner_kwargs: dict, input_ids: torch.Tensor | None) -> ImageLayout | None:
        """Images in their scatter order (forward with pixels, or generate()'s pre-encoded features)."""
        if inner_kwargs.get("pixel_values") is not None:
            image_sizes = inner_kwargs.get("image_sizes")
            if image_sizes is None:
                raise UnsupportedInputError(
                    "LLaVA-OneVision needs image_sizes with pixel_values: pass the image_sizes the processor returns"
                )
            return self.packing(image_sizes, inner_kwargs.get("batch_num_images"))
        counts = self.precomputed_counts(inner_kwargs)
        if counts is None:
            return None
        if self._latest_images is None:
            raise UnsupportedInputError(
                "precomputed LLaVA-OneVision image features without their image_sizes: tokprune saw no "
                "get_image_features call since apply(); pass pixel_values and image_sizes"
            )
        layout = self._latest_images
        if counts != layout.counts:  # generate() repeated rows (beams, num_return_sequences)
            layout = layout.expanded(input_ids == self.image_token_id, counts)
        return layout

    def _videos(self, inner_kwargs: dict) -> ImageLayout | None:
        """Videos in their scatter order: frames x pooled grid + one newline each."""
        pixels = inner_kwargs.get("pixel_values_videos")
        if pixels is not None:
            n_videos, frames = pixels.shape[:2]
            return self.video_layout([frames] * n_videos)
        counts = self.precomputed_counts(inner_kwargs, "video")  # frames * frame_tokens + 1 per clip
        if counts is None:
            return None
        frames = []
        for count in counts:
            n_frames, rest = divmod(count - 1, self.frame_tokens)
            if rest or n_frames < 1:
                raise UnsupportedInputError(
                    f"a video feature of {count} tokens is not frames x {self.frame_tokens} + 1 newline"
                )
            frames.append(n_frames)
        return self.video_layout(frames)

    def video_layout(self, frames: list[int]) -> ImageLayout:
        """Clips of `frames` frames: one unit per frame, the final newline a separator."""
        layout = ImageLayout(counts=[], grids=[], units=[], separators=[])
        for n_frames in frames:
            count = n_frames * self.frame_tokens + 1
            starts = range(0, n_frames * self.frame_tokens, self.frame_tokens)
            units = [
                Unit(index=torch.arange(s, s + self.frame_tokens), grid=self.frame_grid, kind="frame")
                for s in starts
            ]
            separators = torch.zeros(count, dtype=torch.bool)
            separators[-1] = True
            layout.counts.append(count)
            layout.grids.append(self.frame_grid if n_frames == 1 else None)
            layout.units.append(units)
            layout.separators.append(separators)
        return layout

    def tower_inputs(self, image_sizes: torch.Tensor, batch_num_images) -> list[int]:
        """Tower inputs per image (base + tiles; 1 for the images of a several-image prompt), as the model
        counts them in get_image_features."""
        cfg = self.model.config
        if batch_num_images is None:
            patching = [True] * len(image_sizes)
        else:
            patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            if patch
            else 1
            for size, patch in zip(image_sizes, patching)
        ]

    def packing(
        self, image_sizes: torch.Tensor, batch_num_images=None, aspect: str | None = None
    ) -> ImageLayout:
        """Layout of the packed images, from the model's packing replayed on patch coordinates.

        Every tower token gets 3 channels: (newline flag 0, row, column) in its image's full tile grid
        (base view: its own grid). The packing crops, moves and bilinearly interpolates them like
        features; newline tokens come out as (1, 0, 0).
        """
        cfg = self.model.config
        tiles = self.tower_inputs(image_sizes, batch_num_images)
        shapes = [self._tile_grid(size, n) for size, n in zip(image_sizes, tiles)]
        coords = [self._coordinates(shape) for shape in shapes]
        packed, _ = self.inner.pack_image_features(
            coords, image_sizes, image_newline=torch.tensor([1.0, 0.0, 0.0]),
            vision_aspect_ratio=aspect or cfg.vision_aspect_ratio,
        )  # fmt: skip
        layout = ImageLayout(counts=[], grids=[], units=[], separators=[])
        for tokens, shape in zip(packed, shapes):
            newline = tokens[:, 0] > 0.5
            layout.counts.append(tokens.shape[0])
            layout.grids.append((self.side, self.side) if shape is None else None)
            layout.units.append(None if shape is None else self._units(tokens, newline, shape))
            layout.separators.append(newline)
        return layout

    def _tile_grid(self, image_size: torch.Tensor, n_tiles: int) -> tuple[int, int] | None:
        """(tile rows, tile columns) of an AnyRes image; None for a base view alone."""
        if n_tiles == 1:
            return None
        cfg = self.model.config
        rows, cols = get_anyres_image_grid_shape(
            image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
        )
        if rows * cols != n_tiles - 1:
            raise RuntimeError(
                f"{n_tiles - 1} tiles do not form the {rows}x{cols} grid of image size {image_size}"
            )
        return rows, cols

    def _coordinates(self, shape: tuple[int, int] | None) -> torch.Tensor:
        """(1 + tiles, tile_tokens, 3) float32: (0, row, column) of every patch in its grid."""
        patch = torch.arange(self.tile_tokens)
        local = torch.stack([patch // self.side, patch % self.side], -1).float()  # (T, 2)
        grids = [local]
        if shape is not None:
            rows, cols = shape
            for tile in range(rows * cols):
                offset = torch.tensor([tile // cols, tile % cols], dtype=torch.float32) * self.side
                grids.append(local + offset)
        return torch.nn.functional.pad(torch.stack(grids), (1, 0))

    def _units(self, tokens: torch.Tensor, newline: torch.Tensor, shape: tuple[int, int]) -> list[Unit]:
        """Base view + every tile with tokens left, each the rectangle of packed tokens it owns.

        tokens: (n, 3) packed coordinates of one AnyRes image; newline: (n,) bool; shape: its tile grid.
        """
        rows, cols = shape
        units = [Unit(index=torch.arange(self.tile_tokens), grid=(self.side, self.side), kind="base")]
        grid = tokens[self.tile_tokens :]
        width = grid.shape[0] // max(1, int(newline[self.tile_tokens :].sum()))  # packed columns + newline
        # the tile holding each token's sampling point (exact patch centres without interpolation)
        tile_row = ((grid[:, 1] + 0.5) // self.side).long().clamp(0, rows - 1)
        tile_col = ((grid[:, 2] + 0.5) // self.side).long().clamp(0, cols - 1)
        owner = torch.where(newline[self.tile_tokens :], -1, tile_row * cols + tile_col)
        for tile in range(rows * cols):
            index = (owner == tile).nonzero().squeeze(1)
            if index.numel() == 0:  # the tile lies wholly in the unpadded margin
                continue
            h, w = (index // width).unique().numel(), (index % width).unique().numel()
            grid_hw = (h, w) if h * w == index.numel() else None
            units.append(Unit(index=index + self.tile_tokens, grid=grid_hw, kind="tile"))
        return units

    # ---- signals --------------------------------------------------------------------------------------
    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        handles = super().install_vision_hooks(names, store)
        self._staged, self._latest_images, self._input_ids = {}, None, None
        wraps = [_wrap_features(self, store, kind) for kind in KINDS]
        inner = self.inner.register_forward_pre_hook(self._remember_ids, with_kwargs=True)
        publish = self.language_model.register_forward_pre_hook(
            self._publisher(store, lambda: bool(names) or self._features), with_kwargs=True, prepend=True
        )
        return [*wraps, inner, publish, *handles]

    def install_feature_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """ "features" (and "vit_cls" on a tower with [CLS]) per tower token as on LLaVA-1.5, then packed or
        pooled with the ViT signals into the LLM order (`stage`)."""
        handles = super().install_feature_hooks(names, store)
        if "features" in names:
            self._features = True
            handles.append(_Reset(self, "_features", False))
        return handles

    def _remember_ids(self, module, args, kwargs) -> None:
        self._input_ids = kwargs.get("input_ids", args[0] if args else None)

    def _publisher(self, store: VisionSignalStore, needed):
        """Language-model pre-hook (runs before the engine's): the signals of this prefill's images and
        videos, interleaved in sequence order, become the store's values (when `needed()`)."""

        def hook(module, args, kwargs) -> None:
            cache = cache_in(kwargs)
            input_ids = self._input_ids
            if input_ids is None or (cache is not None and cache.get_seq_length(0) > 0):
                return
            if needed():
                with timed(store.seconds, input_ids.device):
                    values = self.sequence_signals(input_ids)
                store.values.clear()
                store.values.update(values)

        return hook

    def sequence_signals(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: (N_visual, ...)}: the staged per-kind signals placed at their ranks among all visual tokens
        of `input_ids` (row-major), expanded first if generate() repeated the rows."""
        masks = self.kind_masks(input_ids)
        visual = masks["image"] | masks["video"]
        total = int(visual.sum())
        out: dict[str, torch.Tensor] = {}
        for kind, mask in masks.items():
            n = int(mask.sum())
            if n == 0:
                continue
            if kind not in self._staged:
                raise UnsupportedInputError(
                    f"the prompt holds {kind}s whose features were not computed by this model since "
                    "tokprune.apply (pass pixels, or encode them after applying)"
                )
            signals = align_signals(self._staged[kind], mask)
            rank = mask[visual].nonzero().squeeze(1)  # ranks of this kind's tokens among all visual tokens
            for name, value in signals.items():
                if value.shape[0] != n:
                    raise UnsupportedInputError(
                        f"ViT signals cover {value.shape[0]} {kind} tokens, the prompt holds {n}"
                    )
                if name not in out:
                    out[name] = value.new_zeros((total, *value.shape[1:]))
                out[name][rank.to(value.device)] = value
        return out

    def stage(self, kind: str, store: VisionSignalStore, arguments: dict) -> None:
        """After a vision pass of `kind`: its signals (per tower input) in that kind's LLM order."""
        values = dict(store.values)
        if values:
            device = next(iter(values.values())).device
            with timed(store.seconds, device):
                values = (
                    self._pack_images(values, arguments)
                    if kind == "image"
                    else self._pool_videos(values, arguments)
                )
        self._staged[kind] = values
        store.values.clear()
        store.values.update(values)

    def _pack_images(self, values: dict[str, torch.Tensor], arguments: dict) -> dict[str, torch.Tensor]:
        """Replay pack_image_features on the signals (newline tokens get 0)."""
        channels, split = _as_channels(values, self.tile_tokens)  # (inputs, T, C)
        image_sizes = arguments["image_sizes"]
        per_image = torch.split(channels, self.tower_inputs(image_sizes, arguments.get("batch_num_images")))
        aspect = arguments.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        packed, _ = self.inner.pack_image_features(
            list(per_image),
            image_sizes,
            image_newline=channels.new_zeros(channels.shape[-1]),
            vision_aspect_ratio=aspect,
        )
        return split(torch.cat(packed))

    def _pool_videos(self, values: dict[str, torch.Tensor], arguments: dict) -> dict[str, torch.Tensor]:
        """Replay apply_pooling on the signals of every frame; the clip's final newline gets 0."""
        n_videos, frames = arguments["pixel_values_videos"].shape[:2]
        channels, split = _as_channels(values, self.tile_tokens)  # (videos * frames, T, C)
        pooled = self.inner.apply_pooling(channels).reshape(n_videos, -1, channels.shape[-1])
        pooled = torch.cat([pooled, pooled.new_zeros(n_videos, 1, pooled.shape[-1])], 1)
        return split(pooled.flatten(0, 1))


def _as_channels(values: dict[str, torch.Tensor], tokens: int):
    """Stack signals {(N,) or (N, d)} as (N / tokens, tokens, C) float32 channels; the returned function
    splits (M, C) back into {(M,) or (M, d)}: float32, except the features before the projector ("features",
    "vit_cls"), which get their own dtype back (the packing only moves them, so they come back exact)."""
    widths = {name: (value[0].numel(), value.shape[1:]) for name, value in values.items()}
    dtypes = {name: value.dtype for name, value in values.items() if name in FEATURES}
    channels = torch.cat([value.float().reshape(value.shape[0], -1) for value in values.values()], 1)

    def split(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, [width for width, _ in widths.values()], dim=1)
        out = {name: part.reshape(-1, *shape) for (name, (_, shape)), part in zip(widths.items(), parts)}
        return {name: value.to(dtypes.get(name, value.dtype)) for name, value in out.items()}

    return channels.view(-1, tokens, channels.shape[-1]), split


def _wrap_features(adapter: LlavaOnevisionAdapter, store: VisionSignalStore, kind: str) -> InstanceWrap:
    """Wrap get_{kind}_features on the instance: every vision pass starts afresh and stages its signals."""
    name = f"get_{kind}_features"
    original = getattr(adapter.inner, name)
    signature = inspect.signature(original)

    @functools.wraps(original)  # generate() inspects the signature to pre-encode images and videos
    def get_features(*args, **kwargs):
        arguments = signature.bind_partial(*args, **kwargs).arguments
        store.values.clear()
        out = original(*args, **kwargs)
        if kind == "image":
            sizes, batch_num_images = arguments["image_sizes"], arguments.get("batch_num_images")
            adapter._latest_images = adapter.packing(
                sizes, batch_num_images, arguments.get("vision_aspect_ratio")
            )
        adapter.stage(kind, store, arguments)
        return out

    return InstanceWrap(adapter.inner, name, get_features)


class _Reset:
    """A hook handle whose remove() sets `owner.<name>` back to `value`."""

    def __init__(self, owner: object, name: str, value: object) -> None:
        self.owner, self.name, self.value = owner, name, value

    def remove(self) -> None:
        setattr(self.owner, self.name, self.value)
