"""ViT signals inside vLLM's CLIP / SigLIP vision tower, from the tower's own fused qkv projections.

A forward hook on a layer's `self_attn.qkv_proj` reads the queries and keys the layer computed and turns them
into the signals a method asked for with `tokprune.signals.vit_signal` — the function the HF adapters use —
so no N x N map is formed and nothing is projected twice. Layers are numbered as in the full tower
(`vision_config.num_hidden_layers`), as the HF adapters number them; vLLM builds the tower only up to the
feature layer, so a signal of a deeper layer is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from tokprune.errors import ServingError
from tokprune.patches.base import Adapter, default_object_layer, signals_by_layer
from tokprune.signals import vit_signal
from tokprune.signals.attention import VIT_SIGNALS

FEATURE_SIGNALS = ("features", "vit_cls")  # the tower's output rows; its [CLS] at the feature layer


class TowerSignals:
    """Hooks on one vLLM vision transformer (`vision_model`: .encoder.layers of attention layers) that fill
    `values` ({signal name: (N_visual, ...)}, images one after another) during a tower call.

    full_layers: the layers of the full tower (the config's); feature_index: the index of the layer whose
    output feeds the projector; has_cls: token 0 of every image is a [CLS] token; first_feature: the first
    token the projector receives (1 when the strategy drops [CLS], else 0).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        names: tuple[str, ...],
        full_layers: int,
        feature_index: int,
        has_cls: bool,
        first_feature: int,
    ) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.has_cls, self.first = has_cls, first_feature
        layers = vision_model.encoder.layers
        by_layer = signal_layers(names, full_layers, feature_index, has_cls)
        deepest = len(layers) - 1
        for index in by_layer:
            if index > deepest:
                raise ServingError(
                    f"the method needs vision layer {index}, but the tower is built only up to layer {deepest}"
                )
        self.handles = [
            layers[i].self_attn.qkv_proj.register_forward_hook(self._qkv_hook(wanted, layers[i].self_attn))
            for i, wanted in by_layer.items()
        ]
        if "vit_cls" in names and has_cls and first_feature == 1:
            self.handles.append(layers[feature_index].register_forward_hook(self._cls_hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _qkv_hook(self, wanted: dict[str, str], attention: nn.Module):
        """Forward hook on a qkv projection: output (qkv (n_img, T, 3 * C), bias)."""
        head_dim, scale = attention.head_dim, attention.scale

        @torch.no_grad()
        def hook(module, args, output):
            qkv = output[0] if isinstance(output, tuple) else output
            n_img, length, _ = qkv.shape
            q, k, _ = qkv.chunk(3, dim=-1)
            keys = k.reshape(n_img, length, -1, head_dim).transpose(1, 2)  # (n_img, H, T, d)
            queries = lambda: q.reshape(n_img, length, -1, head_dim).transpose(1, 2)  # noqa: E731
            for name, base in wanted.items():
                value = vit_signal(base, queries, keys, scale, self.has_cls)  # (n_img, T, ...)
                self.values[name] = value[:, self.first :].flatten(0, 1)

        return hook

    def _cls_hook(self, module, args, output) -> None:
        """The feature layer's [CLS] row on every patch token of its image (VisionZip's extra token)."""
        hidden = output[0] if isinstance(output, tuple) else output  # (n_img, 1 + P, C)
        tokens = hidden.shape[1] - 1
        self.values["vit_cls"] = hidden[:, :1].expand(-1, tokens, -1).flatten(0, 1)

    def take(self) -> dict[str, torch.Tensor]:
        """The values of the last tower call (and forget them)."""
        values, self.values = self.values, {}
        return values


def signal_layers(
    names: tuple[str, ...], full_layers: int, feature_index: int, has_cls: bool
) -> dict[int, dict[str, str]]:
    """{layer index: {signal name: base name}} of the ViT signals among `names` (numbered as in the full
    tower of `full_layers` layers, as the HF adapters number them); refuses a signal the tower cannot give.
    On a tower without [CLS] the [CLS]-query signals become those of what each patch receives."""
    vit = {n for n in names if n.split("@")[0] in VIT_SIGNALS}
    unknown = set(names) - vit - set(FEATURE_SIGNALS)
    if unknown:
        raise ServingError(
            f"the plugin's vision tower cannot give the signal(s) {', '.join(sorted(unknown))}"
        )
    by_layer = signals_by_layer(vit, full_layers, feature_index, default_object_layer(full_layers))
    if has_cls:
        return by_layer
    renamed = {i: {n: "received_attention" if b == "cls_attention" else b for n, b in w.items()}
               for i, w in by_layer.items()}  # fmt: skip
    return Adapter.without_cls(renamed)
