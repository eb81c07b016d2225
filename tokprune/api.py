"""The public API: `apply`, `available_methods`, `available_models` and the `Pruner` handle (DESIGN §3)."""

from __future__ import annotations

from torch import nn

from tokprune.core.budget import Budget, check_video_budget
from tokprune.core.conversations import conversation_of
from tokprune.core.engine import Engine
from tokprune.core.stats import PruneStats
from tokprune.errors import (
    AlreadyPatchedError,
    BudgetError,
    MethodOptionError,
    ReproductionError,
    UnknownMethodError,
    UnsupportedModelError,
)
from tokprune.methods import LLMMethod, Method, available_methods, make_method, make_stage
from tokprune.methods.attention_llm import reject_budget_conflict
from tokprune.methods.base import CompositeMethod
from tokprune.patches import ADAPTERS, Adapter, adapter_for, supported_model_classes
from tokprune.patches import model_families as _families

_ATTRIBUTE = "_tokprune_pruner"


class Pruner:
    """Handle of one pruning configuration installed on one model instance.

    Use as a context manager or call `remove()`; afterwards the model behaves bit-identically to a
    model that was never patched. `stats` describes the most recent prefill (None before the first),
    `stats_for(cache)` the last one of the conversation held by a cache.
    Calls through the model are serialised (one forward or generate() at a time; other threads wait).
    """

    def __init__(
        self,
        model: nn.Module,
        methods: list[Method],
        budgets: list[Budget],
        order: str = "original",
        positions: str = "original",
    ) -> None:
        self.model = model
        self.methods = methods
        self.budgets = budgets
        self.order, self.positions = order, positions
        staged = list(zip(methods, budgets))
        pre = next(((m, b) for m, b in staged if not isinstance(m, LLMMethod)), None)
        llm = [(m, b) for m, b in staged if isinstance(m, LLMMethod)]
        self._engine: Engine | None = Engine(adapter_for(model), pre, llm, order, positions)
        self._final_stats: PruneStats | None = None
        setattr(model, _ATTRIBUTE, self)

    @property
    def stats(self) -> PruneStats | None:
        """The stats of the most recent prefill or follow-up turn through the model (a text-only prefill
        included: no visual tokens), whatever conversation it belongs to; None before the first."""
        return self._engine.last_stats if self._engine is not None else self._final_stats

    def stats_for(self, cache) -> PruneStats | None:
        """The stats of the last prefill or follow-up turn of the conversation held by `cache` (the
        `past_key_values` it continues; several conversations may interleave on one model). None where this
        pruner never ran a prefill into that cache (or after `remove()`)."""
        if self._engine is None:
            return None
        conversation = conversation_of(cache, self._engine.key)
        return conversation.stats if conversation is not None else None

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


def _resolve_methods(method, options: dict) -> list[tuple[Method, Budget | None]]:
    """The methods of `apply`'s `method` argument, each with its own budget (from a pair) or None."""
    items = method if isinstance(method, list) else [method]
    if not items:
        raise UnknownMethodError(f"no method given; available methods: {', '.join(available_methods())}")
    if len(items) > 1 and options:
        raise MethodOptionError(
            "options cannot be shared by several methods; pass method objects instead, e.g. "
            "[tokprune.methods.make_method('visionzip', {}), tokprune.methods.make_method('fastv', {'layer': 3})]"
        )
    resolved: list[tuple[Method, Budget | None]] = []
    for item in items:
        if isinstance(item, Method):
            if options:
                raise MethodOptionError("give options to the method object itself, not to apply()")
            resolved.append((item, None))
        elif isinstance(item, str):
            resolved.append((make_method(item, options), None))
        elif (
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], (str, Method))
            and isinstance(item[1], dict)
        ):
            if options:
                raise MethodOptionError("give options inside the (name, options) pairs, not to apply()")
            resolved.append(make_stage(*item))
        else:
            raise UnknownMethodError(
                f"method must be a registered name or a tokprune Method, got {type(item).__name__}; "
                f"available methods: {', '.join(available_methods())}"
            )
    parts = [part for m, _ in resolved for part in _parts(m)]  # a composite counts as its stages
    pre = [m for m in parts if not isinstance(m, LLMMethod)]
    if len(pre) > 1 or (pre and parts[0] is not pre[0]):
        raise MethodOptionError(
            "compose at most one pre-LLM method, first, followed by in-LLM methods in layer order, e.g. "
            "['visionzip', 'fastv'] or ['visionzip', ('fastv', {'layer': 2}), ('pdrop', {'layers': (8, 16)})]"
        )
    return resolved


def _stage_budgets(
    resolved: list[tuple[Method, Budget | None]], budget: int | None, keep_ratio: float | None
) -> list[Budget]:
    """Every method's budget: its own (from its pair); else, for the last method, apply's budget /
    keep_ratio; else its published default. Giving the last method both is an error."""
    given = budget is not None or keep_ratio is not None
    final, final_own = resolved[-1]
    user_budget = Budget.from_args(budget, keep_ratio, final.default_budget)
    if given and final_own is not None:
        raise BudgetError(
            f"{final.name} got a budget twice: in its (method, options) pair and as apply()'s "
            f"budget/keep_ratio; give it once (apply()'s sets the last method only when its pair has none)"
        )
    reject_budget_conflict(final, given)
    last = len(resolved) - 1
    return [
        own if own is not None else (user_budget if i == last else m.default_budget)
        for i, (m, own) in enumerate(resolved)
    ]


def apply(
    model: nn.Module,
    method,
    *,
    budget: int | None = None,
    keep_ratio: float | None = None,
    video_budget: str = "frame",
    order: str = "original",
    positions: str = "original",
    **options,
) -> Pruner:
    """Patch `model` in place to prune visual tokens with `method`; returns the `Pruner` handle.

    method: a registered name (`available_methods()`), a Method object, or a list to compose: at most one
        pre-LLM method first, then in-LLM methods in layer order; each item a name, a Method object or a
        pair (name, options) / (Method object, {"budget": ...}).
    budget: visual tokens kept per image at the method's final stage (per frame for video, see
        video_budget); keep_ratio: the kept fraction, ceil(keep_ratio * n). Give at most one; neither = the
        method's published default. Composition budget rule: every method of the list counts its budget on the
        tokens each image has when that method starts. A method given as a pair may set its own count
        there, `("visionzip", {"budget": 192})` or `(method_object, {"keep_ratio": 0.5})` (at most one of
        the two per pair); apply()'s budget / keep_ratio set the last method, unless its pair sets its own
        (giving both is an error); every other method keeps its published default. A multi-stage method (a
        `CompositeMethod`: mustdrop, visiondrop) is installed as its stages: its budget is the final count
        and `part_budgets` gives the earlier stages theirs. `Pruner.stats.stages` reports every stage.
    video_budget: how `budget` counts a video clip of t frames (Qwen-VL: t temporal slices; LLaVA-OneVision:
        t pooled frames): "frame" (default, DESIGN §3) keeps min(budget * t, n) of the clip's n content
        tokens, "clip" keeps min(budget, n). Methods that rank tokens rank the whole clip with that count,
        spatial methods split it over the frames by size; a multi-stage method's earlier stages follow from
        the clip's final count; every method of a composition counts the same way. keep_ratio is the same
        fraction in both modes, ceil(keep_ratio * n) over the whole clip. Families that receive a video as
        separate images (InternVL, SmolVLM: the model's inputs do not group the frames) count every frame
        as an image, i.e. per frame, and refuse "clip".
    order, positions: the reproduction mode, the authors' pipeline end to end. order="selection" hands the
        LLM each image's kept tokens in the order the method's released code emits them (e.g. VisionZip's
        dominant tokens, then its contextual ones) instead of their order in the image ("original", the
        default); positions="contiguous" numbers the kept sequence 0, 1, 2, ... as the original LLaVA code
        does when it rebuilds the sequence, instead of keeping every token's original position
        ("original", the default: the better choice for grounding, DESIGN §4). Both are defined only where
        the authors' code exists: every method given must list the model's family in its `code_families`,
        and the model must use 1-D positions (not Qwen's M-RoPE); otherwise `ReproductionError`. A
        follow-up turn that brings images on a reused cache is refused under positions="contiguous".
    options: the method's own options (e.g. layer=3 for fastv); with a single method only.
    """
    existing = getattr(model, _ATTRIBUTE, None)
    if existing is not None:
        raise AlreadyPatchedError(
            f"this model is already patched by {existing!r}; call .remove() on it first, or compose methods in "
            "one call: tokprune.apply(model, ['visionzip', 'fastv'])"
        )
    adapter = adapter_for(model)  # unsupported classes fail before anything else
    _reject_clip_budget(adapter, check_video_budget(video_budget))
    resolved = _resolve_methods(method, options)
    methods = [m for m, _ in resolved]
    _reject_missing_tiles(adapter, methods)
    _check_reproduction(adapter, methods, order, positions)
    budgets = _stage_budgets(resolved, budget, keep_ratio)
    staged = [(part, b) for m, budget in zip(methods, budgets) for part, b in _staged(m, budget)]
    budgets = [b.with_video(video_budget) for _, b in staged]
    return Pruner(model, [m for m, _ in staged], budgets, order, positions)


def _parts(method: Method) -> list[Method]:
    return method.parts() if isinstance(method, CompositeMethod) else [method]


def _staged(method: Method, budget: Budget) -> list[tuple[Method, Budget]]:
    """A composite method as its parts, each with its share of `budget`; any other method as itself."""
    if not isinstance(method, CompositeMethod):
        return [(method, budget)]
    return list(zip(method.parts(), method.part_budgets(budget), strict=True))


def available_models() -> list[str]:
    """Class names of every supported model (their families: `model_families()`)."""
    return supported_model_classes()


def model_families() -> dict[str, str]:
    """{class name of every supported model: its family}, e.g. {"LlavaForConditionalGeneration": "llava",
    "Qwen3VLMoeForConditionalGeneration": "qwen3_vl", ...}; `tokprune models` prints it."""
    return _families()


def _reject_clip_budget(adapter: Adapter, video_budget: str) -> None:
    """video_budget="clip" on a family whose model receives a video as separate images: refuse, since
    tokprune cannot tell which frames form a clip (it would silently count per frame)."""
    if video_budget == "clip" and adapter.frames_as_images:
        raise UnsupportedModelError(
            f"video_budget='clip' needs video clips, but {type(adapter.model).__name__} receives a video as "
            "separate images (its inputs do not say which frames form a clip), so every frame is budgeted "
            "as an image; use video_budget='frame' (the default)"
        )


def _reject_missing_tiles(adapter: Adapter, methods: list[Method]) -> None:
    """AnyRes-only methods (`needs_tiles`) on a model whose images have no tiles: fail before installing."""
    for m in methods:
        if m.needs_tiles and not adapter.tiles:
            tiled = [name for a in ADAPTERS if a.tiles for name in a.model_classes]
            raise UnsupportedModelError(
                f"{m.name} needs AnyRes images (a base view and high-resolution tiles), but "
                f"{type(adapter.model).__name__} has no tiles; models with tiles: {', '.join(tiled)}"
            )


ORDERS = ("original", "selection")
POSITIONS = ("original", "contiguous")


def _check_reproduction(adapter: Adapter, methods: list[Method], order: object, positions: object) -> None:
    """The reproduction mode's values, and that every method's released code runs on the model's family."""
    for name, value, choices in (("order", order, ORDERS), ("positions", positions, POSITIONS)):
        if not isinstance(value, str) or value not in choices:
            raise ReproductionError(
                f"{name} must be one of {', '.join(map(repr, choices))} (the first is the default), got {value!r}"
            )
    if (order, positions) == ("original", "original"):
        return
    mode = f"order={order!r}, positions={positions!r}"
    if adapter.position_rows() != 1:
        raise ReproductionError(
            f"the reproduction mode ({mode}) rebuilds the sequence the way the authors' LLaVA code does, with "
            f"1-D positions; {type(adapter.model).__name__} uses M-RoPE position rows, which keep their original "
            "values; use order='original', positions='original'"
        )
    for m in methods:
        if adapter.family not in m.code_families:
            where = ", ".join(m.code_families) if m.code_families else "none (no released code)"
            raise ReproductionError(
                f"{m.name}: the reproduction mode ({mode}) reproduces the authors' released code, which runs on "
                f"the model families {where}, not on {adapter.family} ({type(adapter.model).__name__}); use the "
                "defaults order='original', positions='original' there"
            )
