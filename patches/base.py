"""What every model-family adapter provides to the engine.

An adapter knows where things are in one family of models (vision tower, its attention layers, the
language model and its decoder layers), how the visual tokens of a prompt split into images and grids,
and how to compute ViT-side signals in hooks. It never knows which method runs.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tokprune.core.layout import ImageLayout, VisionSignalStore  # noqa: F401 (re-exported)
from tokprune.core.masks import build_layer_mask
from tokprune.core.state import TokenMap
from tokprune.core.wrap import InstanceWrap  # noqa: F401 (re-exported)
from tokprune.errors import MethodOptionError
from tokprune.signals.attention import LOGIT_SIGNALS, WITHOUT_CLS


class Adapter:
    """Base adapter. Subclasses set `model_classes` and implement the abstract methods."""

    model_classes: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = ""
    # signals a ViT hook of this family can produce; "name@i" asks for it at vision layer i (negative
    # from the end), "name@object" at the family's object-centric middle layer (HiPrune), plain "name"
    # at the layer whose output feeds the projector
    # and the signals of the layer's pre-softmax logits (`tokprune.signals.LOGIT_SIGNALS`): "cls_logits",
    # "cls_attention_concat" (of the [CLS] query: on towers without one, of what each patch receives,
    # `without_cls`),
    # "logit_column_mean", "logit_row_mean"
    vision_signals: ClassVar[tuple[str, ...]] = (
        "cls_attention", "received_attention", "vit_keys", *LOGIT_SIGNALS,
    )  # fmt: skip
    # signals read off the vision tower's *features* (not its attention), for methods that work where the
    # authors' code does, before the projector (`Method.features == "vision"`): "features" = the rows the
    # projector receives, one per visual token; "vit_cls" = the tower's [CLS] token at the feature layer,
    # repeated on every token of its image / tile. A family lists those it can give.
    feature_signals: ClassVar[tuple[str, ...]] = ()
    # images come as AnyRes units: a "base" view of the whole image and "tile"s whose tokens follow the
    # raster order of the whole tile mosaic (LLaVA-NeXT's packing; `methods.anyres` rebuilds the mosaic
    # from that). Methods with `needs_tiles` (HiRED, GlobalCom²) are refused on adapters without it.
    # Tiles laid out one after another (InternVL) do not say where each tile sits, so they do not qualify.
    tiles: ClassVar[bool] = False
    # the model receives a video as separate images (InternVL, SmolVLM: its inputs do not group the frames
    # into a clip), so every frame is its own budget unit and `video_budget="clip"` is refused. Families
    # with clips (Qwen-VL, LLaVA-OneVision) describe each as one item of "frame" units instead.
    frames_as_images: ClassVar[bool] = False

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

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the placeholder positions the vision features fill (images; videos where a family
        supports them), in the order masked_scatter fills them."""
        return input_ids == self.image_token_id

    def compact_lm_kwargs(self, kwargs: dict, keep: torch.Tensor, visual: torch.Tensor) -> None:
        """After pre-LLM pruning: subset, in place, any language-model kwarg that follows the tokens
        beyond inputs_embeds / attention_mask / position_ids (e.g. Qwen3-VL's deepstack features).

        keep: (B, L) bool tokens kept (text and visual); visual: (B, L) bool visual positions before
        pruning. The default has nothing to do.
        """

    def compact_stage(self, keep: torch.Tensor, visual: torch.Tensor) -> None:
        """An in-LLM stage is about to compact the sequence: layers from its boundary on see only `keep`.

        keep: (B, L_cur) bool tokens kept; visual: (B, L_cur) bool visual positions of the current sequence.
        For state the language model applies to visual tokens inside its layer loop (Qwen3-VL's deepstack
        adds after layers 0-2). The default has nothing to do.
        """

    def install_lm_hooks(self) -> list:
        """Hooks / instance wraps on the language model this family needs (removed with the pruner)."""
        return []

    def layer_mask(
        self,
        hidden_states: torch.Tensor,
        mask_2d: torch.Tensor,
        past_key_values,
        layer_idx: int,
        kind: str,
        tokens: TokenMap | None = None,
    ):
        """The mask decoder layers of type `kind` get for the (possibly compacted) sequence, sized against
        the cache of `layer_idx` (the first layer of that type that sees this sequence).

        hidden_states: (B, Q, D) queries (batch, length, dtype); mask_2d: (B, past + Q) padding mask;
        tokens: the current prefill's token map (which slots hold which image), None in decode steps.
        The default is the causal (sliding-window) mask; families that attend within images
        bidirectionally (Gemma 3) override it.
        """
        return build_layer_mask(self.text_config, hidden_states, mask_2d, past_key_values, layer_idx, kind)

    # ---- per-forward facts ------------------------------------------------------------------------
    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        """Images of this forward from the inner model's kwargs; None when there are no images."""
        raise NotImplementedError

    @staticmethod
    def precomputed_counts(inner_kwargs: dict, kind: str = "image") -> list[int] | None:
        """Tokens per image (per video: kind="video") when generate() passes precomputed
        `mm_encoder_outputs` instead of pixels."""
        outputs = (inner_kwargs.get("mm_encoder_outputs") or {}).get(kind)
        if outputs is None:
            return None
        return [int(features.shape[0]) for features in outputs.pooler_output]

    def is_vision_signal(self, name: str) -> bool:
        return name.split("@")[0] in self.vision_signals or name in self.feature_signals

    # ---- the projector: features before it, for methods that merge there ---------------------------------
    @property
    def projector(self) -> nn.Module:
        """The module mapping the vision tower's features to the LLM input token by token (its input rows are
        the "features" signal)."""
        return self.inner.multi_modal_projector

    def feature_rows(self, projector_input: torch.Tensor) -> torch.Tensor:
        """(N, C) one row per visual token, in the order the store keeps ViT signals, from the projector's
        input (images / tiles, tokens, C)."""
        return projector_input.flatten(0, -2)

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """(m, C) projector-input rows -> (m, D) LLM input rows (what the model's projector makes of them).
        The "features" hook ignores this call (`_reprojecting`): the store keeps the vision pass's rows,
        which a later forward without a vision pass (generate(use_cache=False)) reuses."""
        self._reprojecting = True
        try:
            return self.projector(rows)
        finally:
            self._reprojecting = False

    def install_feature_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """Hooks filling `store` with the requested `feature_signals` (names: a subset of them): a pre-hook on
        the projector for "features"; a family that gives "vit_cls" extends this."""
        if "features" not in names:
            return []

        def hook(module, args):
            if not getattr(self, "_reprojecting", False):
                store.values["features"] = self.feature_rows(args[0])

        return [self.projector.register_forward_pre_hook(hook)]

    @staticmethod
    def without_cls(by_layer: dict[int, dict[str, str]]) -> dict[int, dict[str, str]]:
        """`signals_by_layer`'s result for a tower without [CLS] (SigLIP, Qwen): the signals of the [CLS]
        query become those of the attention each patch receives (`signals.attention.WITHOUT_CLS`), as
        "cls_attention" does on such towers."""
        return {
            layer: {name: WITHOUT_CLS.get(base, base) for name, base in wanted.items()}
            for layer, wanted in by_layer.items()
        }

    def signals_by_layer(self, names: set[str], num_layers: int, default: int) -> dict[int, dict[str, str]]:
        """{vision layer index: {full signal name: base name}} for the requested vision signals."""
        return signals_by_layer(names, num_layers, default, self.object_layer(num_layers))

    def object_layer(self, num_layers: int) -> int:
        """Index of the middle vision layer whose attention is most object-centric (HiPrune's analysis):
        the 9th of CLIP-L's 24 layers (3/8 of the depth, counted from 1), i.e. index 8; subclasses override."""
        return default_object_layer(num_layers)

    def position_rows(self) -> int:
        """1 for (B, L) position ids, 3 for Qwen's M-RoPE (3, B, L)."""
        return 1

    def follow_up_positions(
        self, inner_kwargs: dict, input_ids: torch.Tensor, mask: torch.Tensor, first: torch.Tensor
    ) -> torch.Tensor | None:
        """Positions of a follow-up turn's new tokens (B, L) that bring images, where transformers does not
        number them as the whole conversation would: (rows, B, L) from `first` (B,), the original position
        of each row's first real new token; mask: (B, L) their padding mask. None where transformers' own
        positions are right (1-D RoPE families)."""
        return None

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """Hooks that fill `store` with the requested ViT signals during the vision forward."""
        raise NotImplementedError

    def hook_attention_layers(
        self,
        by_layer: dict[int, dict[str, str]],
        layers: nn.ModuleList,
        make_hook,
        attention: str = "self_attn",
        projections: tuple[str, ...] = ("q_proj", "k_proj"),
    ) -> list:
        """One forward hook per requested vision layer, on its attention module (`attention` attribute);
        `make_hook(wanted, tap)` builds the hook for that layer's {full name: base name} signals, `tap` the
        layer's `ProjectionTap` over `projections` (its hooks are among the returned handles)."""
        handles = []
        for index, wanted in by_layer.items():
            module = getattr(layers[index], attention)
            tap = ProjectionTap(module, projections)
            # no_grad: signals only select (a checkpointed layer re-runs its forward in backward, where the hook
            # does not compute them again: they must save nothing for autograd)
            hook = torch.no_grad()(make_hook(wanted, tap))
            handles += [*tap.handles, module.register_forward_hook(hook, with_kwargs=True)]
        return handles


def default_object_layer(num_layers: int) -> int:
    """HiPrune's object-centric layer of a CLIP-style tower of `num_layers` layers: 3/8 of the depth
    (counted from 1), as an index (CLIP-L: 8)."""
    return max(0, round(num_layers * 3 / 8) - 1)


def signals_by_layer(
    names: set[str], num_layers: int, default: int, object_layer: int
) -> dict[int, dict[str, str]]:
    """{vision layer index: {full signal name: base name}} for the requested vision signals of a tower of
    `num_layers` layers: "name" at `default` (the feature layer), "name@i" at layer i (negative from the
    end), "name@object" at `object_layer`. Raises MethodOptionError for a layer the tower does not have."""
    by_layer: dict[int, dict[str, str]] = {}
    for name in names:
        base, _, layer = name.partition("@")
        if layer == "object":
            index = object_layer
        elif not layer:
            index = default
        elif -num_layers <= int(layer) < num_layers:
            index = int(layer) % num_layers
        else:
            raise MethodOptionError(
                f"signal {name!r} asks for vision layer {layer}, but the vision tower has {num_layers} "
                f"layers (valid: {-num_layers} .. {num_layers - 1}); choose the method's layers accordingly"
            )
        by_layer.setdefault(index, {})[name] = base
    return by_layer


class ProjectionTap:
    """The outputs of an attention module's input projections (`q_proj`, `k_proj`, Qwen's fused `qkv`) as
    the module's own forward computed them, for the signal hook on that module: the signals reuse them
    instead of projecting the hidden states a second time. The signal hook runs inside `with tap:`, which
    drops them when it ends, so nothing outlives the forward that made them."""

    def __init__(self, attention: nn.Module, names: tuple[str, ...]) -> None:
        self.attention = attention
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [getattr(attention, name).register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output

        return hook

    def output(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """(..., out) `name`'s projection of `hidden` (..., C): the one the forward computed, or, if it did
        not call that projection on an input of this shape, a fresh one (kept for the next call)."""
        out = self.outputs.get(name)
        if out is None or out.shape[:-1] != hidden.shape[:-1]:
            out = self.outputs[name] = getattr(self.attention, name)(hidden)
        return out

    def __enter__(self) -> ProjectionTap:
        return self

    def __exit__(self, *exc) -> None:
        self.outputs.clear()
