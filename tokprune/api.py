"""The public API: `apply`, `available_methods`, `available_models` and the `Pruner` handle (DESIGN §3)."""

from __future__ import annotations

from torch import nn

from tokprune.core.budget import Budget
from tokprune.core.engine import Engine
from tokprune.core.stats import PruneStats
from tokprune.errors import AlreadyPatchedError, MethodOptionError, UnknownMethodError
from tokprune.methods import LLMMethod, Method, available_methods, make_method
from tokprune.methods.attention_llm import reject_budget_conflict
from tokprune.patches import adapter_for, supported_model_classes

_ATTRIBUTE = "_tokprune_pruner"


class Pruner:
    """Handle of one pruning configuration installed on one model instance.

    Use as a context manager or call `remove()`; afterwards the model behaves bit-identically to a
    model that was never patched. `stats` describes the most recent prefill (None before the first).
    """

    def __init__(self, model: nn.Module, methods: list[Method], budgets: dict[str, Budget]) -> None:
        self.model = model
        self.methods = methods
        pre = next((m for m in methods if not isinstance(m, LLMMethod)), None)
        llm = next((m for m in methods if isinstance(m, LLMMethod)), None)
        self._engine: Engine | None = Engine(adapter_for(model), pre, llm, budgets)
        self._final_stats: PruneStats | None = None
        setattr(model, _ATTRIBUTE, self)

    @property
    def stats(self) -> PruneStats | None:
        return self._engine.last_stats if self._engine is not None else self._final_stats

    def remove(self) -> None:
        """Take every hook off the model. Idempotent."""
        if self._engine is None:
            return
        self._final_stats = self._engine.last_stats
        self._engine.remove()
        if getattr(self.model, _ATTRIBUTE, None) is self:
            delattr(self.model, _ATTRIBUTE)
        self._engine = None

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = " + ".join(m.name for m in self.methods)
        state = "removed" if self._engine is None else "active"
        return f"Pruner({names}, {state})"


def _resolve_methods(method, options: dict) -> list[Method]:
    items = method if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise UnknownMethodError(f"no method given; available methods: {', '.join(available_methods())}")
    if len(items) > 1 and options:
        raise MethodOptionError(
            "options cannot be shared by several methods; pass method objects instead, e.g. "
            "[tokprune.methods.make_method('visionzip', {}), tokprune.methods.make_method('fastv', {'layer': 3})]"
        )
    methods = []
    for item in items:
        if isinstance(item, Method):
            if options:
                raise MethodOptionError("give options to the method object itself, not to apply()")
            methods.append(item)
        elif isinstance(item, str):
            methods.append(make_method(item, options))
        else:
            raise UnknownMethodError(
                f"method must be a registered name or a tokprune Method, got {type(item).__name__}; "
                f"available methods: {', '.join(available_methods())}"
            )
    pre = [m for m in methods if not isinstance(m, LLMMethod)]
    llm = [m for m in methods if isinstance(m, LLMMethod)]
    if len(pre) > 1 or len(llm) > 1:
        raise MethodOptionError("compose at most one pre-LLM method followed by one in-LLM method")
    return pre + llm


def apply(
    model: nn.Module, method, *, budget: int | None = None, keep_ratio: float | None = None, **options
) -> Pruner:
    """Patch `model` in place to prune visual tokens with `method`; returns the `Pruner` handle.

    method: a registered name (`available_methods()`), a Method object, or a list [pre-LLM, in-LLM] to
        compose. budget: visual tokens kept per image at the method's final stage; keep_ratio: the kept
        fraction, ceil(keep_ratio * n). Give at most one; neither = the method's published default. In a
        composition both apply to the in-LLM stage (counted on the tokens entering the LLM) and the
        pre-LLM method keeps its default.
    options: the method's own options (e.g. layer=3 for fastv).
    """
    existing = getattr(model, _ATTRIBUTE, None)
    if existing is not None:
        raise AlreadyPatchedError(
            f"this model is already patched by {existing!r}; call .remove() on it first, or compose methods in "
            "one call: tokprune.apply(model, ['visionzip', 'fastv'])"
        )
    adapter_for(model)  # unsupported classes fail before anything else
    methods = _resolve_methods(method, options)
    final = methods[-1]
    user_budget = Budget.from_args(budget, keep_ratio, final.default_budget)
    reject_budget_conflict(final, budget is not None or keep_ratio is not None)
    budgets = {}
    for m in methods:
        key = "llm" if isinstance(m, LLMMethod) else "pre"
        budgets[key] = user_budget if m is final else m.default_budget
    return Pruner(model, methods, budgets)


def available_models() -> list[str]:
    """Class names of every supported model."""
    return supported_model_classes()
