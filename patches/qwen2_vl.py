"""Qwen2-VL and Qwen2.5-VL: a CLS-free ViT over flattened patches, 2x2 patch merging, M-RoPE positions,
images and videos.

The ViT has no [CLS] token, so the "cls_attention" signal is the attention each patch *receives* (column
mean of the softmax map, streamed) at the scoring block, averaged over the patches merged into one LLM
token. Qwen2.5-VL runs its blocks in window order (`window_index`); signals are put back in raster order.
The pre-softmax logit means ("logit_column_mean", "logit_row_mean") run within every attention block of
the layer (an image, a video's temporal slice, or a window) and are pooled the same way; the signals of the
[CLS] query become those of what each patch receives (`Adapter.without_cls`).

Features before the projector ("features", for methods with `features == "vision"`): the merger
(`visual.merger`) applies `ln_q` to every patch, views the merge**2 = 4 consecutive patches of an LLM token
as one row and runs its MLP. A feature row is those 4 patches' hidden states concatenated *before* `ln_q`
(width 4C), in raster order like the ViT signals (Qwen2.5-VL's merger input is in window order: the rows
are put back with the model's own reverse index, argsort(window_index)); `project` runs the merger on them
(ln_q per patch chunk, then the MLP), which reproduces the model's LLM input of every image and video token.

Videos (`pixel_values_videos`, `video_grid_thw`, placeholder `video_token_id`) are visual items like
images: transformers scatters image features into the image placeholders and video features into the
video placeholders separately, each in its own order; the adapter describes all items of a forward in
the order their tokens appear in the sequence (rows in order, left to right), which is the order of the
engine's visual mask (image | video placeholders), and assembles the ViT signals of the image pass and the
video pass in that same order. A video of grid (t, h, w) gives t*h*w/4 LLM tokens, temporal slice by
temporal slice; it is one item made of t frame units (a frame = one temporal slice, i.e.
temporal_patch_size = 2 video frames), each an (h/2, w/2) grid, so that spatial methods work frame by
frame. Budget (`core.budget`): `budget=k` keeps min(k * t, n) tokens of the clip (k per frame, the default
`video_budget="frame"`) or min(k, n) with `video_budget="clip"`; `keep_ratio` is a fraction of the clip.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from tokprune.core.layout import Item, Unit, sequence_order
from tokprune.core.timing import timed
from tokprune.errors import UnsupportedInputError
from tokprune.signals import LOGIT_SIGNALS, logit_signal, received_attention

from .base import Adapter, ImageLayout, InstanceWrap, ProjectionTap, VisionSignalStore

KINDS = ("image", "video")  # visual item kinds, in the order their ViT parts are kept
_PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: every block attends within each image / video frame (cu_seqlens); the last block feeds the
    merger."""

    model_classes = ("Qwen2VLForConditionalGeneration",)
    family = "qwen2_vl"
    feature_signals = ("features",)  # the merger's input, 2x2 patches per row (no [CLS])

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = self.inner.visual
        self.merge = self.visual.spatial_merge_size
        self.score_layer = self.default_score_layer()
        self._grids: dict[str, torch.Tensor | None] = dict.fromkeys(KINDS)  # of the latest pass of each kind
        self._encoding: str | None = None  # the kind whose vision pass is running
        self._parts: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}  # per-kind ViT signals
        self._order: list[tuple[str, int, int]] | None = None  # (kind, start in its part, count) per item
        self._totals: dict[str, int] = {}  # visual tokens of each kind in the current forward
        self._kinds: tuple[str, ...] = ("image",)  # kinds present in the current forward
        self._store: VisionSignalStore | None = None

    def default_score_layer(self) -> int:
        """The block whose output feeds the patch merger (the analogue of LLaVA's feature layer)."""
        return len(self.visual.blocks) - 1

    def position_rows(self) -> int:
        return 3

    def follow_up_positions(
        self, inner_kwargs: dict, input_ids: torch.Tensor, mask: torch.Tensor, first: torch.Tensor
    ) -> torch.Tensor:
        """The new turn's M-RoPE rows (3, B, L) as the whole conversation numbers them: the model's own
        `get_rope_index` over the turn (which counts from 0 at its first real token, a text token) moved
        to `first` (B,). mask: (B, L) the turn's padding mask."""
        types = torch.zeros_like(input_ids, dtype=torch.int)  # transformers' codes: 1 image, 2 video
        for code, placeholders in enumerate(self.kind_masks(input_ids).values(), start=1):
            types[placeholders] = code
        grids = {
            f"{kind}_grid_thw": self._grid(kind, inner_kwargs) if self._present(kind, inner_kwargs) else None
            for kind in KINDS
        }
        extra = {k: inner_kwargs[k] for k in ("second_per_grid_ts",) if inner_kwargs.get(k) is not None}
        rows, _ = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=types, attention_mask=mask, **grids, **extra
        )
        start = rows[0].gather(1, mask.long().argmax(1, keepdim=True)).squeeze(1)  # at the first real token
        return (rows + (first.to(rows) - start)[None, :, None]).masked_fill(~mask.bool()[None], 1)

    def install_lm_hooks(self) -> list:
        return [InstanceWrap(self.model, _GENERATION_POSITIONS, _continued_turn_positions(self.model))]

    def object_layer(self, num_layers: int) -> int:
        """Half the depth: the 16th of Qwen2.5-VL's 32 blocks (HiPrune's setting, counted from 1), index 15."""
        return max(0, num_layers // 2 - 1)

    @property
    def video_token_id(self) -> int:
        return self.model.config.video_token_id

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: image placeholders, and video placeholders when the forward has videos."""
        mask = input_ids == self.image_token_id
        if "video" in self._kinds:
            mask = mask | (input_ids == self.video_token_id)
        return mask

    # ---- layout -----------------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        """Images and videos of this forward in sequence order; also fixes the order of the ViT signals."""
        grids = {kind: self._grid(kind, inner_kwargs) for kind in KINDS if self._present(kind, inner_kwargs)}
        self._kinds, self._order = tuple(grids) or ("image",), None
        if not grids:
            return None
        counts = {kind: self._token_counts(grid) for kind, grid in grids.items()}
        precomputed = {kind: self.precomputed_counts(inner_kwargs, kind) for kind in grids}
        expand = _expansion(counts, precomputed)
        input_ids = inner_kwargs.get("input_ids")
        if input_ids is None:  # the engine rejects this forward (it needs input_ids); any order will do
            items = [(kind, i) for kind in grids for i in range(len(counts[kind]))]
        else:  # generate() repeats every row `expand` times: the originals are rows 0, e, 2e, ...
            items = sequence_order(self.kind_masks(input_ids[::expand]), counts)
        self._set_signal_order(items, counts)
        layout = self._items_layout(items, grids)
        if expand > 1:
            counts = {kind: precomputed[kind] or counts[kind] for kind in grids}
            expanded = sequence_order(self.kind_masks(input_ids), counts)
            layout = layout.expanded(self.visual_mask(input_ids), [counts[k][i] for k, i in expanded])
        return layout

    def _present(self, kind: str, inner_kwargs: dict) -> bool:
        return (
            inner_kwargs.get(_PIXELS[kind]) is not None
            or self.precomputed_counts(inner_kwargs, kind) is not None
        )

    def _grid(self, kind: str, inner_kwargs: dict) -> torch.Tensor:
        grid = inner_kwargs.get(f"{kind}_grid_thw")
        if grid is None:  # generate() encoded the pixels before the prefill and passes only features
            grid = self._grids[kind]
        if grid is None:
            raise UnsupportedInputError(
                f"precomputed {kind} features without {kind}_grid_thw: pass {kind}_grid_thw"
            )
        return grid

    def _token_counts(self, grid_thw: torch.Tensor) -> list[int]:
        """LLM tokens of every item of one kind: t * h * w / merge**2."""
        return [int(t * h * w) // self.merge**2 for t, h, w in grid_thw.tolist()]

    def kind_masks(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """kind -> (B, L) bool placeholders of images and of videos, in the order of KINDS."""
        return {"image": input_ids == self.image_token_id, "video": input_ids == self.video_token_id}

    def _items_layout(self, items: list[Item], grids: dict[str, torch.Tensor]) -> ImageLayout:
        """counts, grids and (for videos) frame units of the items, in the given order."""
        layout = ImageLayout(units=[])
        for kind, index in items:
            t, h, w = (int(v) for v in grids[kind][index].tolist())
            h, w = h // self.merge, w // self.merge
            layout.counts.append(t * h * w)
            layout.grids.append((h, w) if t == 1 else None)
            layout.units.append(_frames(t, h, w) if kind == "video" else None)
        if all(units is None for units in layout.units):
            layout.units = None
        return layout

    # ---- ViT signals ------------------------------------------------------------------------------
    def _set_signal_order(self, items: list[Item], counts: dict[str, list[int]]) -> None:
        starts = {kind: [sum(n[:i]) for i in range(len(n))] for kind, n in counts.items()}
        self._order = [(kind, starts[kind][i], counts[kind][i]) for kind, i in items]
        self._totals = {kind: sum(n) for kind, n in counts.items()}
        self._publish(None)

    def _publish(self, encoded: str | None) -> None:
        """Write the ViT signals of the current forward into the store, in sequence order.

        Before any forward fixed the order (a direct vision call), the pass of kind `encoded` is written as
        is. A signal whose parts do not all match the forward's items is left out (a later pass of this
        forward completes it).
        """
        store = self._store
        if store is None:
            return
        if self._order is None:
            if encoded is not None:
                store.values.update(self._parts[encoded])
            return
        names = set().union(*(self._parts[kind] for kind in self._kinds))
        for name in names:
            parts = [self._parts[kind].get(name) for kind, _, _ in self._order]
            if any(p is None or p.shape[0] != self._totals[k] for p, (k, _, _) in zip(parts, self._order)):
                store.values.pop(name, None)
                continue
            store.values[name] = torch.cat(
                [p[start : start + n] for p, (_, start, n) in zip(parts, self._order)]
            )

    def merged_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Permutation taking the block order of merged units back to raster order (None: identity)."""
        return None

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.visual.blocks), self.score_layer)  # validates first
        by_layer = self.without_cls(by_layer)  # the Qwen ViT has no [CLS]
        self._store = store
        handles = [_wrap_features(self, kind) for kind in KINDS]
        return handles + self.hook_attention_layers(
            by_layer,
            self.visual.blocks,
            lambda wanted, tap: self._hook(wanted, store, tap),
            attention="attn",
            projections=("qkv",),
        )

    # ---- features before the merger -----------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        """The patch merger (`visual.merger`): ln_q per patch, the merge**2 patches of an LLM token
        concatenated, an MLP."""
        return self.visual.merger

    def feature_rows(self, projector_input: torch.Tensor) -> torch.Tensor:
        """(S / merge**2, merge**2 * C) from the merger's input (S, C) of the running pass: per LLM token its
        merge**2 patches' hidden states concatenated, before `ln_q` (the merger's own grouping: the
        consecutive patches it views as one row), in raster order (Qwen2.5-VL's window order undone)."""
        rows = projector_input.reshape(-1, self.merge**2 * projector_input.shape[-1])
        order = self.merged_order(self._grids[self._encoding])
        return rows if order is None else rows[order.to(rows.device)]

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """(m, merge**2 * C) -> (m, D): the merger on the rows' patches (ln_q per patch chunk, then the MLP)."""
        return self.projector(rows.reshape(-1, rows.shape[-1] // self.merge**2))

    def install_feature_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """ "features": a pre-hook on the merger, kept with the ViT signals of the running pass (images or
        videos) and put in sequence order with them (`_publish`)."""
        if "features" not in names:
            return []

        def hook(module, args):
            if self._encoding is not None:
                self._parts[self._encoding]["features"] = self.feature_rows(args[0])

        return [self.projector.register_forward_pre_hook(hook)]

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore, tap: ProjectionTap):
        """Forward hook on one ViT block's attention computing `wanted` ({full name: base name}) while the
        tower runs inside get_image_features / get_video_features (`_block_signals`)."""

        def hook(module, args, kwargs, output):
            with tap:
                if self._encoding is not None:
                    with timed(store.seconds, output.device):
                        self._block_signals(module, wanted, tap, args, kwargs)

        return hook

    def _block_signals(self, module: nn.Module, wanted: dict[str, str], tap: ProjectionTap, args, kwargs):
        """`wanted` per LLM token (pooled over the merged patches) in raster order, for the images or the
        videos of the running pass, from the qkv projection the block computed (`tap`). The ViT has no
        [CLS]: "cls_attention" is the attention each patch receives within its block's attention pattern
        (an image, a video's temporal slice, or a window)."""
        kind, group = self._encoding, self.merge**2
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (S, C)
        seq = hidden.shape[0]
        q, k, _ = (
            tap.output("qkv", hidden).reshape(seq, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        order = self.merged_order(self._grids[kind])
        rotated, received = None, None
        cu_seqlens = kwargs["cu_seqlens"]
        sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()  # the block's attention blocks (images, windows)
        for name, base in wanted.items():
            if base in ("vit_keys", "vit_keys_concat"):  # content keys (before RoPE), pooled per merged unit
                value = k.float().mean(1) if base == "vit_keys" else k.float().flatten(1)  # (S, d) / (S, C)
                value = value.view(seq // group, group, -1).mean(1)
                self._parts[kind][name] = value if order is None else value[order]
                continue
            if rotated is None:
                rotated = self._rotated(q, k, kwargs)  # (H, S, d) each
            if base in LOGIT_SIGNALS:  # logit means within every attention block
                value = logit_signal(base, *rotated, module.scaling, block_sizes=sizes)
                value = value.view(seq // group, group).mean(1)
            else:  # cls_attention / received_attention
                if received is None:
                    received = received_attention(*rotated, module.scaling, sizes)
                    received = received.view(seq // group, group).mean(1)
                value = received
            self._parts[kind][name] = value if order is None else value[order]

    @staticmethod
    def _rotated(q: torch.Tensor, k: torch.Tensor, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, S, d) queries and keys after the block's vision RoPE, as its attention uses them."""
        cos, sin = kwargs["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # (S, H, d)
        return q.transpose(0, 1), k.transpose(0, 1)


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: windowed blocks except `fullatt_block_indexes`; scores come from the last full block."""

    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    family = "qwen2_5_vl"

    def default_score_layer(self) -> int:
        return max(self.visual.fullatt_block_indexes)

    def merged_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=self.merge,
            window_size=self.visual.window_size,
            patch_size=self.visual.patch_size,
        )
        return torch.argsort(window_index)


def _expansion(counts: dict[str, list[int]], precomputed: dict[str, list[int] | None]) -> int:
    """How many times generate() repeated every row (num_beams, num_return_sequences): 1 if it did not."""
    factors = {len(pre) // len(counts[kind]) for kind, pre in precomputed.items() if pre is not None}
    if not factors:
        return 1
    if len(factors) > 1 or any(
        pre is not None and len(pre) % len(counts[kind]) for kind, pre in precomputed.items()
    ):
        raise RuntimeError(f"precomputed features {precomputed} do not repeat the items {counts}")
    return factors.pop()


def _frames(t: int, h: int, w: int) -> list[Unit]:
    """The t temporal slices of a video, each an (h, w) grid of LLM tokens."""
    return [Unit(index=torch.arange(f * h * w, (f + 1) * h * w), grid=(h, w), kind="frame") for f in range(t)]


_GENERATION_POSITIONS = "_prepare_position_ids_for_generation"


def _continued_turn_positions(model: nn.Module):
    """generate()'s position preparation without `mm_token_type_ids` when it continues a cache.

    transformers looks for new images in `mm_token_type_ids[:, cache length:]`, which a pruned (shorter)
    cache mis-aligns: it then runs `get_rope_index` on the new turn with the whole conversation's mask and
    fails. The engine renumbers a continued turn that brings images itself (`follow_up_positions`), so the
    text positions transformers gives a continued turn without them are all it needs."""
    original = getattr(model, _GENERATION_POSITIONS)

    @functools.wraps(original)
    def prepare(inputs_tensor, model_kwargs):
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            model_kwargs = {k: v for k, v in model_kwargs.items() if k != "mm_token_type_ids"}
        return original(inputs_tensor, model_kwargs)

    return prepare


def _wrap_features(adapter: Qwen2VLAdapter, kind: str) -> InstanceWrap:
    """Mark the vision pass of `get_{kind}_features`, remember its grid, then publish its ViT signals."""
    name = f"get_{kind}_features"
    original = getattr(adapter.inner, name)

    @functools.wraps(original)  # generate() inspects the signature to pre-encode images and videos
    def get_features(*args, **kwargs):
        if adapter._encoding is not None:  # Qwen3-VL encodes videos through get_image_features
            return original(*args, **kwargs)
        adapter._grids[kind] = kwargs.get(f"{kind}_grid_thw", args[1] if len(args) > 1 else None)
        adapter._encoding = kind
        try:
            out = original(*args, **kwargs)
        finally:
            adapter._encoding = None
        adapter._publish(kind)
        return out

    return InstanceWrap(adapter.inner, name, get_features)
