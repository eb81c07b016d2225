"""Model-family adapters (installed as `tokprune.patches`). One module per family."""

from __future__ import annotations

from torch import nn

from tokprune.errors import UnsupportedModelError

from .base import Adapter, ImageLayout, VisionSignalStore
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .smolvlm import SmolVLMAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    InternVLAdapter,
    SmolVLMAdapter,
    Gemma3Adapter,
)


def supported_model_classes() -> list[str]:
    """Class names of every supported model."""
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def model_families() -> dict[str, str]:
    """{supported model class name: its family}, the family being the adapter that handles the class (e.g.
    "Qwen3VLMoeForConditionalGeneration": "qwen3_vl"), in `supported_model_classes()` order."""
    return {name: adapter.family for adapter in ADAPTERS for name in adapter.model_classes}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for this model instance (matched on the exact class name, never on a base class)."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if inner is not None:
        raise UnsupportedModelError(
            f"this is a torch.compile'd {type(inner).__name__}: tokprune changes sequence lengths per prompt "
            "through hooks a compiled graph would not see; apply tokprune to the uncompiled model (do not compile it)"
        )
    if hasattr(model, "get_base_model") and model.get_base_model() is not model:  # a PEFT wrapper
        raise UnsupportedModelError(
            f"{name} wraps a {type(model.get_base_model()).__name__}: pass model.get_base_model() to tokprune.apply"
        )
    raise UnsupportedModelError(
        f"tokprune has no adapter for {name}. Supported model classes: {', '.join(supported_model_classes())}. "
        "Load the model with its *ForConditionalGeneration class (e.g. LlavaForConditionalGeneration)."
    )


__all__ = [
    "ADAPTERS",
    "Adapter",
    "ImageLayout",
    "VisionSignalStore",
    "adapter_for",
    "model_families",
    "supported_model_classes",
]
