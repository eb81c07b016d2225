"""The method registry: registry name -> method class (DESIGN §7)."""

from __future__ import annotations

import dataclasses

from tokprune.core.budget import Budget
from tokprune.errors import BudgetError, MethodOptionError, UnknownMethodError
from tokprune.methods.attention_llm import FastV, PyramidDrop, reject_budget_conflict
from tokprune.methods.base import ImageTokens, LLMMethod, Method, Selection
from tokprune.methods.baselines import RandomPrune, SpatialPool
from tokprune.methods.cdpruner import CDPruner
from tokprune.methods.cls_attention import FasterVLM
from tokprune.methods.dart import DART
from tokprune.methods.divprune import DivPrune
from tokprune.methods.fopru import FoPru
from tokprune.methods.globalcom2 import GlobalCom2
from tokprune.methods.hiprune import HiPrune
from tokprune.methods.hired import HiRED
from tokprune.methods.holov import HoloV
from tokprune.methods.mustdrop import MustDrop
from tokprune.methods.prumerge import PruMerge, PruMergePlus
from tokprune.methods.sparsevlm import SparseVLM
from tokprune.methods.tome import ToMe
from tokprune.methods.visiondrop import VisionDrop
from tokprune.methods.visionzip import VisionZip
from tokprune.methods.vtc_cls import VTCCLS

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        RandomPrune,
        SpatialPool,
        FasterVLM,
        VTCCLS,
        VisionZip,
        PruMerge,
        PruMergePlus,
        DivPrune,
        CDPruner,
        HoloV,
        HiPrune,
        HiRED,
        GlobalCom2,
        ToMe,
        FoPru,
        FastV,
        PyramidDrop,
        SparseVLM,
        DART,
        MustDrop,
        VisionDrop,
    )
}


def available_methods() -> list[str]:
    """Registry names of every method."""
    return sorted(REGISTRY)


ACTS = {"pre": "before LLM", "llm": "in LLM", "pre+llm": "before + in LLM"}


def catalogue() -> list[dict]:
    """One entry per registered method, by name: name, family, acts (where: before / in the LLM), the
    default budget, every option with its default, and the paper (what `tokprune methods` prints)."""
    entries = []
    for name in available_methods():
        cls = REGISTRY[name]
        options = {f.name: _default(f) for f in dataclasses.fields(cls)}
        entries.append(
            dict(name=name, family=cls.family, acts=ACTS[cls.where], default=str(cls.default_budget),
                 options=options, paper=cls.paper)
        )  # fmt: skip
    return entries


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


BUDGET_KEYS = ("budget", "keep_ratio")


def make_method(name: str, options: dict) -> Method:
    """Instantiate a registered method with its options; unknown names and options fail with the choices."""
    if name not in REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; available methods: {', '.join(available_methods())}"
        )
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown & set(BUDGET_KEYS):
        raise MethodOptionError(
            f"{name}: budget and keep_ratio are not method options; give them to tokprune.apply(), or, for "
            f"one method of a composition, inside its pair: "
            f"tokprune.apply(model, [({name!r}, {{'budget': 64}}), ...])"
        )
    if unknown:
        raise MethodOptionError(
            f"{name} has no option {', '.join(sorted(unknown))}; its options are: {', '.join(sorted(fields)) or 'none'}"
        )
    return cls(**options)


def make_stage(method: str | Method, options: dict) -> tuple[Method, Budget | None]:
    """One item of `tokprune.apply`'s method list given as a pair: (name, options) or (method object,
    {"budget": ...} / {"keep_ratio": ...}).

    `budget` / `keep_ratio` in `options` set this method's own count, with the meaning apply() gives them
    for one method (at most one of the two; checked the same way); the other entries are the method's
    options (a method object carries its own, so only the budget may go with it).
    Returns (the method, its own Budget, or None when the pair gives neither).
    """
    budget, keep_ratio = options.get("budget"), options.get("keep_ratio")
    rest = {key: value for key, value in options.items() if key not in BUDGET_KEYS}
    if isinstance(method, Method):
        if rest:
            raise MethodOptionError(
                f"a {method.name} object takes its options itself ({method.name}(...)); only budget or "
                f"keep_ratio may go with it in a pair, got {', '.join(sorted(rest))}"
            )
        made = method
    else:
        made = make_method(method, rest)
    if budget is None and keep_ratio is None:
        return made, None
    try:
        own = Budget.from_args(budget, keep_ratio, made.default_budget)
    except BudgetError as error:
        raise BudgetError(f"{made.name}: {error}") from None
    reject_budget_conflict(made, True)
    return made, own


__all__ = [
    "ACTS",
    "REGISTRY",
    "ImageTokens",
    "catalogue",
    "LLMMethod",
    "Method",
    "Selection",
    "available_methods",
    "make_method",
    "make_stage",
]
