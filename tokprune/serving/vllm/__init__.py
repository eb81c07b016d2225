"""tokprune's pre-LLM methods inside vLLM, as an out-of-tree plugin (extra `vllm`).

The package registers itself under the entry point group `vllm.general_plugins`, which vLLM loads in every
process (API server, engine core, workers). `register()` adds tokprune's architectures to vLLM's
`ModelRegistry`; a model runs one of them when its config says so:

    from tokprune.serving.vllm import llm
    engine = llm("llava-hf/llava-1.5-7b-hf", "visionzip", budget=64)   # a vllm.LLM
    engine.generate({"prompt": ..., "multi_modal_data": {"image": image}})

or, for `vllm serve`, with the overrides `overrides(model, method, ...)` returns:

    vllm serve llava-hf/llava-1.5-7b-hf --hf-overrides \
      '{"architectures": ["TokpruneLlavaForConditionalGeneration"], "tokprune": {"method": "visionzip", "budget": 64}}'

Supported: LLaVA-1.5 (`LlavaForConditionalGeneration`, CLIP or SigLIP tower). Methods: every fixed-count
pre-LLM method of the registry that needs no prompt text (`servable_methods()`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokprune.errors import UnsupportedModelError
from tokprune.serving.vllm.plan import CONFIG_KEY, ServingPlan, plan_from_entry, servable_methods

# HF architecture -> (tokprune architecture, the module:class vLLM loads lazily)
ARCHITECTURES = {
    "LlavaForConditionalGeneration": (
        "TokpruneLlavaForConditionalGeneration",
        "tokprune.serving.vllm.llava:TokpruneLlava",
    ),
}


def register() -> None:
    """The `vllm.general_plugins` entry point: register tokprune's architectures (lazily imported)."""
    from vllm import ModelRegistry

    for name, target in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, target)


def overrides(
    model: str | Path | None,
    method: str,
    budget: int | None = None,
    keep_ratio: float | None = None,
    order: str = "original",
    architecture: str | None = None,
    **options,
) -> dict:
    """The `hf_overrides` that run `method` on `model` (a local folder with config.json; or give its HF
    `architecture` name instead): {"architectures": [tokprune's], "tokprune": {method, budget, ...}}.

    Validated here, in the caller's process: unknown methods and options, a count that is not fixed per
    image, a method vLLM cannot run, an unsupported architecture fail at once with the reason."""
    entry = {"method": method, "order": order, "options": options}
    entry.update({"budget": budget} if budget is not None else {})
    entry.update({"keep_ratio": keep_ratio} if keep_ratio is not None else {})
    plan = plan_from_entry(entry)
    source = architecture or _architecture_of(model)
    if source not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"tokprune's vLLM plugin does not support {source}; supported: {', '.join(ARCHITECTURES)}"
        )
    return {"architectures": [ARCHITECTURES[source][0]], CONFIG_KEY: plan.entry()}


def llm(
    model: str | Path,
    method: str,
    budget: int | None = None,
    keep_ratio: float | None = None,
    order: str = "original",
    options: dict | None = None,
    **llm_kwargs,
):
    """A `vllm.LLM` of `model` whose images reach the LLM pruned by `method` (options: the method's
    options; llm_kwargs: passed to vllm.LLM, e.g. max_model_len, dtype)."""
    import vllm

    from tokprune.serving.vllm.plan import check_vllm_version

    check_vllm_version(vllm.__version__)
    hf = overrides(model, method, budget, keep_ratio, order, **(options or {}))
    hf.update(llm_kwargs.pop("hf_overrides", None) or {})
    return vllm.LLM(model=str(model), hf_overrides=hf, **llm_kwargs)


def _architecture_of(model: str | Path | None) -> str:
    """The first architecture in a local model folder's config.json."""
    config = Path(model) / "config.json" if model is not None else None
    if config is None or not config.is_file():
        raise UnsupportedModelError(
            f"cannot read the architecture of {model!r} (no config.json there); pass architecture= "
            f"(one of {', '.join(ARCHITECTURES)})"
        )
    names = json.loads(config.read_text()).get("architectures") or []
    return names[0] if names else "(none in config.json)"


__all__ = ["ARCHITECTURES", "ServingPlan", "llm", "overrides", "register", "servable_methods"]
