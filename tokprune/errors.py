"""Exceptions raised by tokprune. Every error says what went wrong and what to do instead."""


class TokpruneError(Exception):
    """Base class of every tokprune error."""


class UnknownMethodError(TokpruneError, ValueError):
    """The method name is not registered."""


class UnsupportedModelError(TokpruneError, TypeError):
    """The model class has no adapter, or lacks what the chosen method needs (AnyRes tiles)."""


class BudgetError(TokpruneError, ValueError):
    """`budget` / `keep_ratio` (or a method's stage options) are out of range or conflicting."""


class AlreadyPatchedError(TokpruneError, ValueError):
    """`apply` was called on a model that already carries a tokprune pruner."""


class MethodOptionError(TokpruneError, TypeError):
    """An option that the method does not define, or one with an invalid value."""


class PatchedModelError(TokpruneError, TypeError):
    """Something a patched model cannot do (copying it: its hooks are bound to the original)."""


class UnsupportedInputError(TokpruneError, ValueError):
    """An input the engine cannot prune correctly (e.g. a static cache)."""


class ReproductionError(TokpruneError, ValueError):
    """The reproduction mode (`apply(order=..., positions=...)`) got a value it does not know, or was asked
    for a method or model family whose authors' pipeline it cannot reproduce."""


class ServingError(TokpruneError, ValueError):
    """The vLLM plugin cannot run what was asked (a method that is not a fixed-count pre-LLM method, an
    untested vLLM release, a setting it cannot reproduce)."""
