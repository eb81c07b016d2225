"""tokprune: training-free visual-token pruning and merging for Hugging Face vision-language models.

with tokprune.apply(model, "visionzip", budget=64):
    model.generate(**inputs)
"""

from tokprune import errors
from tokprune.api import Pruner, apply, available_methods, available_models, model_families
from tokprune.core.stats import PruneStats
from tokprune.robustness import kept_set_stability

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
