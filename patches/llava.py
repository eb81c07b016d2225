"""LLaVA-1.5 (LlavaForConditionalGeneration): a CLIP-style ViT with a [CLS] token (or a SigLIP tower without
one), Llama-style LLM.

Features: with vision_feature_select_strategy "default" the model drops the tower's first token ([CLS]) and
an image gives its h x w patch tokens, a plain grid; with "full" a CLIP tower's [CLS] stays in front of the
patches (h * w + 1 tokens, no grid). A tower without [CLS] (SigLIP: no `class_embedding`) needs "full", where
every patch reaches the projector (h * w tokens, a plain grid); "default" would drop a real patch and is
refused. On such a tower "cls_attention" is the attention each patch *receives* (as on the other SigLIP
families).
"""

from __future__ import annotations

from torch import nn

from tokprune.core.timing import timed
from tokprune.errors import UnsupportedInputError, UnsupportedModelError
from tokprune.signals import vit_signal

from .base import Adapter, ImageLayout, ProjectionTap, VisionSignalStore


def clip_encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """encoder.layers of a CLIP/SigLIP vision model (flat in transformers 5, nested in older wrappers)."""
    for owner in (vision_tower, getattr(vision_tower, "vision_model", None)):
        encoder = getattr(owner, "encoder", None) if owner is not None else None
        if encoder is not None and hasattr(encoder, "layers"):
            return encoder.layers
    raise UnsupportedModelError(
        f"vision tower {type(vision_tower).__name__} is not supported: tokprune needs a CLIP- or SigLIP-style "
        "tower (encoder.layers of attention layers); use a checkpoint with a CLIP or SigLIP vision tower"
    )


def tower_has_cls(vision_tower: nn.Module) -> bool:
    """Whether the tower puts a [CLS] token before the patches (CLIP's `class_embedding`); SigLIP has none."""
    return any(hasattr(module, "class_embedding") for module in vision_tower.modules())


def feature_layer_index(vision_feature_layer: int | list[int], num_layers: int) -> int:
    """Index into encoder.layers of the layer whose *output* is hidden_states[vision_feature_layer].

    hidden_states[0] is the embedding output, hidden_states[i] the output of layers[i - 1]; with several
    feature layers the deepest one is used.
    """
    fl = (
        max(vision_feature_layer, key=lambda i: i % (num_layers + 1))
        if isinstance(vision_feature_layer, (list, tuple))
        else vision_feature_layer
    )
    index = fl % (num_layers + 1) - 1
    if index < 0:
        raise UnsupportedModelError(
            f"vision_feature_layer={vision_feature_layer} selects the patch embeddings, before any attention "
            "layer, so there is no attention to score with; use a layer of the encoder (e.g. -2 or -1)"
        )
    return index


def crop_grid(n_patches: int, keeps_cls: bool) -> tuple[int, int] | None:
    """Square patch grid of a crop's `n_patches` tokens; None when [CLS] is among the features (`keeps_cls`)
    or the tokens are not a square."""
    side = round(n_patches**0.5)
    return None if keeps_cls or side * side != n_patches else (side, side)


class LlavaAdapter(Adapter):
    """Images are square crops of a CLIP ViT; each yields h*w patch tokens (+ [CLS] with strategy 'full'), or
    of a SigLIP tower (no [CLS]; strategy 'full': h*w patch tokens)."""

    model_classes = ("LlavaForConditionalGeneration",)
    family = "llava"
    feature_signals = ("features", "vit_cls")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = model.config
        self.vision_layers = clip_encoder_layers(self.inner.vision_tower)
        self.score_layer = feature_layer_index(cfg.vision_feature_layer, len(self.vision_layers))
        full = cfg.vision_feature_select_strategy == "full"
        self.has_cls = tower_has_cls(self.inner.vision_tower)
        if not self.has_cls and not full:
            raise UnsupportedModelError(
                f"{type(model).__name__} with vision_feature_select_strategy='default' on a tower with no [CLS] "
                f"({type(self.inner.vision_tower).__name__}) is not supported: 'default' drops the first token, a "
                "real patch of every image; use 'full' (the setting of SigLIP checkpoints)"
            )
        self.first_feature = 0 if full else 1  # the tower's first token among the image features
        self.keeps_cls = full and self.has_cls  # a [CLS] token is among the image features
        self.patch_size = cfg.vision_config.patch_size

    def image_layout(self, inner_kwargs: dict) -> ImageLayout | None:
        pixel_values = inner_kwargs.get("pixel_values")
        if inner_kwargs.get("image_sizes") is not None:
            raise UnsupportedInputError(
                "LLaVA with image_sizes (Pixtral-style variable image sizes) is not supported; pass pixel_values "
                "of fixed-size crops (what the processor of a CLIP/SigLIP LLaVA returns) without image_sizes"
            )
        if pixel_values is not None:
            n_images, _, height, width = pixel_values.shape
            h, w = height // self.patch_size, width // self.patch_size
            return ImageLayout(
                counts=[h * w + int(self.keeps_cls)] * n_images, grids=[self._grid(h * w)] * n_images
            )
        counts = self.precomputed_counts(inner_kwargs)
        if counts is None:
            return None
        return ImageLayout(counts=counts, grids=[self._grid(n - int(self.keeps_cls)) for n in counts])

    def _grid(self, n_patches: int) -> tuple[int, int] | None:
        return crop_grid(n_patches, self.keeps_cls)

    def install_vision_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        by_layer = self.signals_by_layer(names, len(self.vision_layers), self.score_layer)
        if not self.has_cls:
            by_layer = self.without_cls(by_layer)
        return self.hook_attention_layers(
            by_layer, self.vision_layers, lambda wanted, tap: self._hook(wanted, store, tap)
        )

    def _hook(self, wanted: dict[str, str], store: VisionSignalStore, tap: ProjectionTap):
        """Forward hook on one CLIP attention module computing `wanted` ({full name: base name}) from the
        projections its forward made (`tap`). A tower without [CLS] gives, for "cls_attention", the attention
        each patch receives. The logit means run over the patches ([CLS] left out)."""
        first = self.first_feature
        has_cls = self.has_cls
        if not self.has_cls:
            wanted = {
                name: "received_attention" if base == "cls_attention" else base
                for name, base in wanted.items()
            }

        def hook(module, args, kwargs, output):
            with timed(store.seconds, output[0].device), tap:
                hidden = kwargs.get("hidden_states", args[0] if args else None)  # (n_img, 1 + P, C), normed
                n_img, length, _ = hidden.shape
                heads = (n_img, length, -1, module.head_dim)
                keys = tap.output("k_proj", hidden).view(heads).transpose(1, 2)  # (n_img, H, 1 + P, d)
                queries = lambda: tap.output("q_proj", hidden).view(heads).transpose(1, 2)  # noqa: E731
                for name, base in wanted.items():
                    value = vit_signal(base, queries, keys, module.scale, has_cls)  # (n_img, 1 + P, ...)
                    store.values[name] = value[:, first:].flatten(0, 1)

        return hook

    def install_feature_hooks(self, names: set[str], store: VisionSignalStore) -> list:
        """ "features" from the projector's input; "vit_cls" from the output of the feature layer (the layer
        whose output is hidden_states[vision_feature_layer]): its [CLS] row, on every token of the image."""
        handles = super().install_feature_hooks(names, store)
        if "vit_cls" not in names or not self.has_cls or self.keeps_cls:
            return handles  # no [CLS] (SigLIP), or it is one of the image's tokens already ("full")

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (n_img, 1 + P, C)
            tokens = hidden.shape[1] - self.first_feature
            store.values["vit_cls"] = hidden[:, :1].expand(-1, tokens, -1).flatten(0, 1)

        return [*handles, self.vision_layers[self.score_layer].register_forward_hook(hook)]
