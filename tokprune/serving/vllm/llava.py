"""LLaVA-1.5 in vLLM with a tokprune pre-LLM method: `TokpruneLlavaForConditionalGeneration`.

The processing info gives every image k = plan.kept(n) placeholders instead of the tower's n tokens;
`_process_image_input` runs the tower with `TowerSignals` hooks, projects, and returns each image's k
embeddings from `pruned_embeddings`. Positions: vLLM numbers the k placeholders contiguously, the original
LLaVA code's convention, so a run here equals tokprune's HF path under `apply(..., positions="contiguous")`
(and `order=` as the plan's). Supported towers: CLIP (with [CLS], strategy "default" or "full") and SigLIP
(no [CLS], strategy "full"), one feature layer.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from tokprune.core.layout import ImageLayout
from tokprune.errors import ServingError, UnsupportedInputError, UnsupportedModelError
from tokprune.patches.llava import crop_grid, feature_layer_index
from tokprune.serving.vllm.plan import plan_of
from tokprune.serving.vllm.runtime import check_runtime
from tokprune.serving.vllm.select import pruned_embeddings
from tokprune.serving.vllm.vision import TowerSignals, signal_layers

ARCHITECTURE = "TokpruneLlavaForConditionalGeneration"


class TokpruneLlavaProcessingInfo(LlavaProcessingInfo):
    """Placeholders per image: the plan's count of the tower's tokens."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return plan_of(self.get_hf_config()).kept(n)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=TokpruneLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokpruneLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose images reach the LLM as the plan's k tokens each."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        check_runtime(vllm_config)
        config = vllm_config.model_config.hf_config
        self.plan = plan_of(config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        tower = self.vision_tower
        if not isinstance(tower, (CLIPVisionModel, SiglipVisionModel)):
            raise UnsupportedModelError(
                f"{ARCHITECTURE} supports CLIP and SigLIP vision towers, not {type(tower).__name__}"
            )
        if isinstance(config.vision_feature_layer, (list, tuple)):
            raise UnsupportedModelError(f"{ARCHITECTURE} supports one vision_feature_layer, not a list")
        has_cls = isinstance(tower, CLIPVisionModel)
        full = config.vision_feature_select_strategy == "full"
        if not has_cls and not full:
            raise UnsupportedModelError(
                "a SigLIP tower (no [CLS]) needs vision_feature_select_strategy='full'"
            )
        self.keeps_cls = has_cls and full  # a [CLS] token is among each image's features: no grid
        layers = config.vision_config.num_hidden_layers
        feature = feature_layer_index(config.vision_feature_layer, layers)
        deepest = max(signal_layers(self.plan.method.signals, layers, feature, has_cls), default=feature)
        self.select_layers = None  # the tower's last layer is the feature layer
        if deepest > feature:  # a signal of a deeper layer (PruMerge's last layer): build the tower to it
            self._build_deeper_tower(vllm_config, prefix, deepest + 1)
            self.select_layers = [config.vision_feature_layer]
        self.signals = TowerSignals(
            self.vision_tower.vision_model,
            self.plan.method.signals,
            layers,
            feature,
            has_cls,
            0 if full else 1,
        )

    def _build_deeper_tower(self, vllm_config, prefix: str, depth: int) -> None:
        """Replace the tower vLLM built up to the feature layer by one of `depth` layers (the layers a signal
        needs run as in HF, whose tower always runs whole); the features still come from the feature layer."""
        tower = self.vision_tower
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = type(tower)(
                vllm_config.model_config.hf_config.vision_config, quant_config=vllm_config.quant_config,
                num_hidden_layers_override=depth, require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"),
            )  # fmt: skip

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        return vision_tower(
            pixel_values, select_layers=self.select_layers,
            feature_select_strategy=self.config.vision_feature_select_strategy,
        )  # fmt: skip

    def _process_image_input(self, image_input) -> tuple[torch.Tensor, ...]:
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise UnsupportedInputError(
                f"{ARCHITECTURE} prunes with the vision tower's signals, so it needs images as pixels; "
                "image_embeds input is not supported"
            )
        features = self._process_image_pixels(image_input)  # (n_img, P, C), the hooks fill the signals
        signals = self.signals.take()
        if not isinstance(features, torch.Tensor):
            raise ServingError(f"{ARCHITECTURE} expects one feature tensor for same-size images")
        n_img, tokens, _ = features.shape
        embeds = self.multi_modal_projector(features)  # (n_img, P, D)
        layout = ImageLayout(counts=[tokens] * n_img, grids=[crop_grid(tokens, self.keeps_cls)] * n_img)
        return tuple(
            pruned_embeddings(
                self.plan, embeds.flatten(0, 1), layout, signals, features.flatten(0, 1),
                self.multi_modal_projector,
            )
        )  # fmt: skip
