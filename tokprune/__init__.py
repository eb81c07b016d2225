"""tokprune: training-free visual-token pruning and merging for Hugging Face vision-language models.

with tokprune.apply(model, "visionzip", budget=64):
    model.generate(**inputs)

The public names load on first use (PEP 562), so that `import tokprune` (and `tokprune --version`,
`--help`) does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokprune import errors
    from tokprune.api import Pruner, apply, available_methods, available_models, model_families
    from tokprune.core.stats import PruneStats
    from tokprune.robustness import kept_set_stability

_HOMES = {
    "Pruner": "tokprune.api",
    "apply": "tokprune.api",
    "available_methods": "tokprune.api",
    "available_models": "tokprune.api",
    "model_families": "tokprune.api",
    "PruneStats": "tokprune.core.stats",
    "kept_set_stability": "tokprune.robustness",
}
__all__ = [
    "PruneStats",
    "Pruner",
    "apply",
    "available_methods",
    "available_models",
    "errors",
    "kept_set_stability",
    "model_families",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    """A public name from its module, or a subpackage (`tokprune.methods`), imported on first use."""
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
