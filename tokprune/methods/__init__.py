"""The method registry: registry name -> method class (DESIGN §7)."""

from __future__ import annotations

import dataclasses

from tokprune.errors import MethodOptionError, UnknownMethodError
from tokprune.methods.attention_llm import FastV, PyramidDrop
from tokprune.methods.base import ImageTokens, LLMMethod, Method, Selection
from tokprune.methods.baselines import RandomPrune, SpatialPool
from tokprune.methods.cdpruner import CDPruner
from tokprune.methods.cls_attention import FasterVLM, VisionZip
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


def make_method(name: str, options: dict) -> Method:
    """Instantiate a registered method with its options; unknown names and options fail with the choices."""
    if name not in REGISTRY:
        raise UnknownMethodError(
            f"unknown method {name!r}; available methods: {', '.join(available_methods())}"
        )
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(options) - fields
    if unknown:
        raise MethodOptionError(
            f"{name} has no option {', '.join(sorted(unknown))}; its options are: {', '.join(sorted(fields)) or 'none'}"
        )
    return cls(**options)


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
]
