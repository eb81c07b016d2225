"""SmolVLM and Idefics3 (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration).

A SigLIP tower without [CLS] encodes every *frame* (a square crop of `image_size` px), the connector's
`pixel_shuffle` merges s x s patches (s = `config.scale_factor`) into one token, and the model scatters
the frames' features, in order, into the `<image>` positions (`config.image_token_id`). The language
model is `model.model.text_model`.

The processor splits an image into a grid of tiles plus a global view (the whole image resized to one
frame), each preceded by text tokens: `<fake_token_around_image><row_r_col_c>` + `<image>` x seq per
tile ("\\n" after each tile row), then `<fake_token_around_image><global-img>` + `<image>` x seq +
`<fake_token_around_image>`; an image that fits one frame is only the global part. The visual tokens of
one image are therefore not contiguous in the sequence. pixel_values are (B, max frames, 3, H, W): a batch
row with fewer frames is padded with all-zero frames, which the model drops before the tower.

Layout rules (what the engine sees):
  * frames: the image-token runs of the prompt, row by row, each cut into blocks of seq tokens, exactly
    the order masked_scatter fills (padding frames are never in the prompt, so they are never counted);
  * images: the frame that closes an image is the global view; it is recognised by the token right
    before its run, which is the same in every row: the token before the last frame of a row (always a
    global view, `<global-img>` with the processor's prompts). Frames before it since the previous image
    are its tiles. Video frames (each a global view) are therefore images of one frame each;
  * budget unit: the image, over all its frames (tiles and global view): `budget` tokens per image;
    spatial methods split it over the frames by size. A multi-frame image has units ("tile" frames, the
    global view last as "base"), each a full (h, w) grid of merged tokens; a one-frame image is a plain grid.
Signals (at the last encoder layer, whose output feeds the connector, or "name@i"): the tower has no
[CLS], so "cls_attention" is the attention each patch *receives* (column mean of the softmax map over the
frame's real patches, streamed), as is "received_attention"; "vit_keys" are the head-mean keys. Each is
pooled (mean) over the patches that the connector merges into one LLM token, found by replaying the
model's own `pixel_shuffle` on patch indices; patches that `pixel_attention_mask` marks as padding
receive 0. The logit means ("logit_column_mean", "logit_row_mean") run over a frame's real patches; the
signals of the [CLS] query become those of what each patch receives (`Adapter.without_cls`).
Features before the projector ("features"): the input of the connector's `modality_projection`, i.e. the
pixel-shuffled frames (s * s * C per LLM token, real frames in order = the LLM's); `project` is that linear
map. No "vit_cls" (SigLIP has no [CLS]).
"""

from __future__ import annotations

import torch
from torch import nn

from tokprune.core.timing import timed
from tokprune.errors import UnsupportedInputError
from tokprune.signals import LOGIT_SIGNALS, logit_signal, received_attention

from .base import Adapter, ImageLayout, ProjectionTap, VisionSignalStore
from .internvl import encoded_images, pool_groups, tile_units, visual_runs
from .llava import clip_encoder_layers


class SmolVLMAdapter(Adapter):
    model_classes = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
    family = "smolvlm"
    feature_signals = ("features",)  # the connector's pixel-shuffled rows (SigLIP has no [CLS])

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # SmolVLMProcessor turns a video into one-frame images ("Frame from 00:01: <global-img>..."); Idefics3
        # takes no video
        self.frames_as_images = type(model).__name__ == "SmolVLMForConditionalGeneration"
        cfg = model.config
        self.vision_layers = clip_encoder_layers(self.inner.vision_model)
        self.score_layer = len(self.vision_layers) - 1  # last_hidden_state feeds the connector
        self.scale = int(cfg.scale_factor)
        self.patch_size = int(cfg.vision_config.patch_size)
        self._groups: dict[int, torch.Tensor] = {}  # patches per frame -> (G, s * s) merged patch indices
        self._patch_mask: torch.Tensor | None = None  # (n_frames, P) of the latest vision pass

    @property
    def language_model(self) -> nn.Module:
        return self.inner.text_model

    @property
    def projector(self) -> nn.Module:
        """The connector's `modality_projection`: its input is the pixel-shuffled frames (n_frames, G, s*s*C),
        one row per LLM token in frame order (the "features" signal)."""
        return self.inner.connector.modality_projection

    # ---- pixel shuffle replay -------------------------------------------------------------------
    def merge_groups(self, n_patches: int) -> torch.Tensor:
        """(G, s * s): for each LLM token of a frame of n_patches (row-major), the patches the model's own
        connector `pixel_shuffle` merges into it, in LLM order."""
        if n_patches not in self._groups:
            index = torch.arange(n_patches, dtype=torch.float32).view(1, n_patches, 1)
            merged = self.inner.connector.pixel_shuffle(index, self.scale)  # (1, G, s * s)
            self._groups[n_patches] = merged[0].round().long()
        return self._groups[n_patches]

    # ---- layout ----------------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        pixel_values = inner_kwargs.get("pixel_values")
        if pixel_values is None and encoded_images(inner_kwargs) is None:
            return None
        input_ids = inner_kwargs.get("input_ids")
        if input_ids is None:
            raise UnsupportedInputError(
                "tokprune needs input_ids (as a keyword, not only inputs_embeds) to find the image tokens"
            )
        side = (
            pixel_values.shape[-1] if pixel_values is not None else self.model.config.vision_config.image_size
        )
        side = side // self.patch_size // self.scale  # merged tokens per frame side
        layout = self.layout_from_ids(input_ids, side)
        if pixel_values is not None:
            frames = int(real_frames(pixel_values).sum())
            if sum(layout.counts) != frames * side * side:
                raise UnsupportedInputError(
                    f"the prompt holds {sum(layout.counts)} image tokens but {frames} real frames give "
                    f"{frames * side * side}: expand every image with the processor"
                )
        return layout

    def layout_from_ids(self, input_ids: torch.Tensor, side: int) -> ImageLayout:
        """Images from the prompt: frames = blocks of side * side image tokens; each image = the frames up
        to and including the next global view (see the module docstring)."""
        frames = self.frames(input_ids, side * side)
        row_ends = [k + 1 == len(frames) or frames[k + 1][0] != row for k, (row, _) in enumerate(frames)]
        closers = {marker for (_, marker), last in zip(frames, row_ends) if last}  # global-view markers
        layout = ImageLayout(counts=[], grids=[], units=[])
        current = 0
        for (_, marker), last in zip(frames, row_ends):
            current += 1
            if marker in closers or last:
                self._append_image(layout, current, side)
                current = 0
        return layout

    def frames(self, input_ids: torch.Tensor, frame_tokens: int) -> list[tuple[int, int | None]]:
        """(row, marker) of every frame in masked_scatter order; marker = the token id right before the
        frame's run of image tokens (None for a frame glued to the previous one, or at position 0)."""
        frames = []
        for row, start, length in visual_runs(self.visual_mask(input_ids)):
            if length % frame_tokens:
                raise UnsupportedInputError(
                    f"a run of {length} image tokens is not a multiple of {frame_tokens} per frame: "
                    "expand every image with the processor"
                )
            marker = int(input_ids[row, start - 1]) if start > 0 else None
            frames += [(row, marker)] + [(row, None)] * (length // frame_tokens - 1)
        return frames

    @staticmethod
    def _append_image(layout: ImageLayout, n_frames: int, side: int) -> None:
        tokens = side * side
        layout.counts.append(n_frames * tokens)
        layout.grids.append((side, side) if n_frames == 1 else None)
        layout.units.append(tile_units(n_frames, tokens, (side, side), "base") if n_frames > 1 else None)

    # ---- vision signals --------------------------------------------------------------------------
    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.vision_layers), self.score_layer)
        by_layer = self.without_cls(by_layer)  # SigLIP has no [CLS]
        if not by_layer:
            return []
        handles = [self.inner.vision_model.register_forward_pre_hook(self._remember_mask, with_kwargs=True)]
        handles += self.hook_attention_layers(
            by_layer, self.vision_layers, lambda wanted, tap: self._hook(wanted, store, tap)
        )
        return handles

    def _remember_mask(self, module, args, kwargs) -> None:
        """Pre-hook on the vision tower: its (n_frames, h, w) patch mask (None: every patch is real)."""
        mask = kwargs.get("patch_attention_mask", args[1] if len(args) > 1 else None)
        self._patch_mask = mask.flatten(1).bool() if mask is not None else None

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore, tap: ProjectionTap):
        """Forward hook on one SigLIP attention module computing `wanted` ({full name: base name}) per LLM
        token: per frame, the value of every patch, pooled over the patches merged into one token; from the
        projections its forward made (`tap`)."""

        def hook(module, args, kwargs, output):
            with timed(store.seconds, output[0].device), tap:
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (n_frames, P, C), normed
                n, length, _ = hidden.shape
                shape = (n, length, -1, module.head_dim)
                keys = tap.output("k_proj", hidden).view(shape).transpose(1, 2)  # (n, H, P, d)
                groups = self.merge_groups(length)
                received = None
                for name, base in wanted.items():
                    if base == "vit_keys":
                        value = keys.float().mean(1)  # (n, P, d)
                    elif base == "vit_keys_concat":
                        value = logit_signal(base, keys, keys, module.scale)  # (n, P, C)
                    elif base in LOGIT_SIGNALS:  # logit means over the frame's real patches
                        queries = tap.output("q_proj", hidden).view(shape).transpose(1, 2)
                        value = self._logit_means(base, queries, keys, module.scale)
                    else:  # cls_attention (no [CLS]: attention received) / received_attention
                        if received is None:
                            queries = tap.output("q_proj", hidden).view(shape).transpose(1, 2)
                            received = self._received(queries, keys, module.scale)
                        value = received
                    store.values[name] = pool_groups(value, groups)

        return hook

    def _logit_means(
        self, base: str, queries: torch.Tensor, keys: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """(n, P) a logit mean of every frame's patches over its real patches; padding patches get 0."""
        mask = self._patch_mask
        n, _, length, _ = queries.shape
        if mask is None or mask.shape != (n, length):
            return logit_signal(base, queries, keys, scale)
        real = mask.to(queries.device)
        return logit_signal(base, queries, keys, scale, real).masked_fill(~real, 0.0)

    def _received(self, queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        """(n, P) attention received per patch of every frame, among the frame's real patches only
        (padding patches are masked keys in the tower, and their queries are left out); padding gets 0."""
        mask = self._patch_mask
        n, _, length, _ = queries.shape
        if mask is None or mask.shape != (n, length) or bool(mask.all()):
            return torch.stack([received_attention(q, k, scale) for q, k in zip(queries, keys)])
        out = torch.zeros(n, length, dtype=torch.float32, device=queries.device)
        for frame, real in enumerate(mask.to(queries.device)):
            if bool(real.any()):
                out[frame, real] = received_attention(queries[frame][:, real], keys[frame][:, real], scale)
        return out


def real_frames(pixel_values: torch.Tensor) -> torch.Tensor:
    """(B * max_frames,) bool: the frames the model encodes (padding frames are all zeros), by its rule."""
    flat = pixel_values.flatten(0, 1).flatten(1)  # (B * max_frames, 3 * H * W)
    return (flat == 0.0).sum(1) != flat.shape[1]
