"""What a method is: a small dataclass that selects (and optionally merges) the visual tokens of one image.

The engine cuts every prompt into images (or frames), gathers the signals the method asked for, and calls
`select` once per image with the number of tokens to keep. A method never sees masks, positions, caches
or the model class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from tokprune.core.budget import Budget
from tokprune.core.layout import Unit


@dataclass
class ImageTokens:
    """The visual tokens of one image (one AnyRes tile / video frame later) at the point of pruning.

    embeds: (n, D) the tokens' current vectors: for pre-LLM methods the LLM input embeddings, or, for a
            method whose `features` is "vision", the rows the projector receives; inside the LLM the hidden
            states.
    grid: (h, w) layout of the tokens in the image, h * w == n, row-major; None if the tokens are no
          longer a full grid (after an earlier in-LLM stage).
    signals: per-token signals the method asked for, each (n,) or (n, d); see the method's `signals`.
    text: text-side tensors some methods use, keyed by name: before the LLM, "embeds" (m, D) = the
          instruction (the row's text after its images) for methods listing "instruction" in `signals`;
          inside the LLM, every requested signal of those text tokens (e.g. DART's text pivots).
    units: the image's spatial units (AnyRes base view and tiles, video frames), each with its token
          indices into these n tokens; None for a plain single-grid image (see `core.layout.Unit`).
    full_n: the image's content tokens before any pruning (n while the image is whole); None outside
          the engine.
    """

    embeds: torch.Tensor
    grid: tuple[int, int] | None
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor] = field(default_factory=dict)
    units: list[Unit] | None = None
    full_n: int | None = None

    @property
    def n(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Selection:
    """The outcome of `select` for one image.

    keep: (k,) sorted LongTensor of kept local indices (the slots of the image that stay in the sequence).
    merged: (k, D) replacement vectors of the kept slots (merging methods), or None (pure pruning). D is
        the width of `ImageTokens.embeds`: the LLM input's, or the projector input's for a method whose
        `features` is "vision" (the adapter projects them).
    order: (k,) permutation of range(k) or None: keep[order] lists the kept slots in the order the
        authors' code hands them to the LLM (`tokprune.apply(..., order="selection")` uses it; None = the
        slots' own order).
    extra: (k,) bool or None: kept slots that carry an *extra* token instead of their own patch (the ViT's
        [CLS] token, a summary of the pruned tokens): the slot only gives the token a place in the
        sequence (`free_slots`), its vector is in `merged`, and its own patch counts as dropped.
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    order: torch.Tensor | None = None
    extra: torch.Tensor | None = None


@dataclass
class Method:
    """Base of every method. Subclasses are dataclasses whose fields are the method's options.

    Class attributes describe the method for the registry and the engine:
      name: registry name; family: the kind of method the catalogue lists it under ("[CLS] attention",
          "diversity", ...); where: "pre" (before the LLM) or "llm" (inside the LLM);
      signals: names of the per-token signals `select` reads from `ImageTokens.signals`;
      default_budget: the published default when neither budget nor keep_ratio is given;
      paper: the citation shown by the catalogue;
      features: what `ImageTokens.embeds` holds for a pre-LLM method: "llm" (the LLM input embeddings, after
          the projector) or "vision" (the vision tower's features as the projector receives them, where
          the authors' code merges; the adapter projects the merged rows, `Adapter.project`);
      code_families: the model families (`Adapter.family`) the authors' released code runs on: where the
          reproduction mode (`tokprune.apply(..., order="selection", positions="contiguous")`) is defined;
      spatial: the method needs a token grid: on images made of several units (AnyRes tiles, video
          frames) the engine runs it on each unit with the budget split by unit size (a property where it
          depends on an option, e.g. FoPru's strategy; methods that handle `ImageTokens.units` themselves,
          such as HoloV and MustDrop, are not spatial);
      needs_tiles: the method only works on AnyRes images (a base view and tiles, `ImageTokens.units`);
          `tokprune.apply` refuses it on models whose adapter has no tiles (`Adapter.tiles`).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    where: ClassVar[str] = "pre"
    signals: ClassVar[tuple[str, ...]] = ()
    default_budget: ClassVar[Budget] = Budget(ratio=0.5)
    paper: ClassVar[str] = ""
    features: ClassVar[str] = "llm"
    code_families: ClassVar[tuple[str, ...]] = ()
    spatial: ClassVar[bool] = False
    needs_tiles: ClassVar[bool] = False

    def select(self, image: ImageTokens, k: int) -> Selection:
        """Choose `k` < image.n tokens of one image: a Selection of exactly k sorted slot indices (extra
        tokens included, `Selection.extra`)."""
        raise NotImplementedError

    def adaptive_count(self, image: ImageTokens) -> int:
        """The tokens to keep of this image when the budget is an `AdaptiveBudget` (the method's own rule,
        e.g. PruMerge's outlier count); only methods whose default budget is adaptive define it."""
        raise NotImplementedError(f"{self.name} has no adaptive count; give it a budget or keep_ratio")


@dataclass
class LLMMethod(Method):
    """A method that acts inside the language model at one or more stage boundaries.

    A boundary b means: layers < b see the tokens of the previous stage, layers >= b only the kept ones.
    `score_at` says where the signals of the boundary come from:
      "previous": the attention module of layer b - 1 (FastV, DART);
      "boundary": layer b's own input layernorm and projections, before it runs (PyramidDrop).
    `counts_on_image`: `stage_counts` gets the image's content tokens before any pre-LLM stage instead of
    the tokens the method receives (the in-LLM part of a `CompositeMethod`, whose schedule starts
    before the LLM).
    `code_positions`: how the authors' code numbers the sequence after this method's drops: "original" (it
    gathers the kept tokens' position ids, FastV) or "contiguous" (it renumbers the shortened sequence
    0, 1, ..., PyramidDrop); tokprune keeps original positions unless `apply(positions="contiguous")`,
    under which a "contiguous" method renumbers from its boundaries on, decode steps included.
    """

    where: ClassVar[str] = "llm"
    score_at: ClassVar[str] = "previous"
    counts_on_image: ClassVar[bool] = False
    code_positions: ClassVar[str] = "original"

    def boundaries(self, num_layers: int) -> list[int]:
        """Stage boundary layers, ascending, each in [1, num_layers - 1]."""
        raise NotImplementedError

    def stage_counts(self, n: int, budget: Budget) -> list[int]:
        """Tokens of an image of n visual tokens kept after each boundary (non-increasing, last = final)."""
        return [budget.kept(n)]


@dataclass(frozen=True, kw_only=True)
class ScaledBudget(Budget):
    """An earlier stage of a multi-stage method: `factor` (>= 1) times the final stage's count.

    kept(n) = min(n, max(f, ceil(factor * f))) with f = final.kept(n), so the stages of one image never
    grow and the final stage keeps exactly what the user's budget says.
    """

    final: Budget = Budget(ratio=1.0)
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.tokens is not None or self.ratio is not None:
            raise TypeError("ScaledBudget takes only final= and factor= (keywords)")

    def kept(self, n: int) -> int:
        f = self.final.kept(n)
        return min(n, max(f, math.ceil(self.factor * f - 1e-9)))

    def __str__(self) -> str:
        return f"{self.factor:g} x ({self.final})"


@dataclass
class CompositeMethod(Method):
    """A method acting at several places (before and inside the LLM): `tokprune.apply` replaces it by its
    `parts()` (at most one pre-LLM method first, then in-LLM methods) with `part_budgets(budget)`, so each
    stage is one engine stage and the stats report every one under the composite's name."""

    where: ClassVar[str] = "pre+llm"

    def parts(self) -> list[Method]:
        """The stages' methods in order: at most one pre-LLM method first, then in-LLM methods."""
        raise NotImplementedError

    def part_budgets(self, budget: Budget) -> list[Budget]:
        """The budget of each part for the user's final `budget` (one per `parts()` entry)."""
        raise NotImplementedError

    def select(self, image: ImageTokens, k: int) -> Selection:
        raise TypeError(f"{self.name} acts through its parts; apply it with tokprune.apply")


def vision_signal(base: str, layer: int | str | None) -> str:
    """The name of a ViT signal at `layer` ("name@layer"), or at the feature layer when layer is None."""
    return base if layer is None else f"{base}@{layer}"


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending (kept tokens stay in their original order).

    Ties are broken towards the lower index, so the result is deterministic.
    """
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return order.sort().values


def free_slots(keep: torch.Tensor, n: int, count: int) -> torch.Tensor:
    """The first `count` of an image's n slots that `keep` (sorted indices) leaves free, ascending: where a
    method places extra tokens (`Selection.extra`), so they sit at the front of the image's place in the
    sequence. Raises ValueError when fewer than `count` slots are free."""
    free = torch.ones(n, dtype=torch.bool, device=keep.device)
    free[keep] = False
    slots = free.nonzero().squeeze(1)[:count]
    if slots.numel() < count:
        raise ValueError(f"{count} extra tokens do not fit in the {n - keep.numel()} free slots of {n}")
    return slots


def trivial_selection(image: ImageTokens, k: int) -> Selection | None:
    """For direct calls outside the engine (which never asks for k >= n): keep the first min(k, n) tokens
    when nothing needs choosing, else None."""
    if 0 < k < image.n:
        return None
    return Selection(keep=torch.arange(max(0, min(k, image.n)), device=image.embeds.device))


def grid_of(image: ImageTokens, method: str) -> tuple[int, int]:
    """The image's (h, w) token grid (a 1 x n strip without one); checks that it holds the n tokens."""
    h, w = image.grid or (1, image.n)
    if h * w != image.n:
        raise ValueError(f"{method}: grid {h}x{w} does not hold the image's {image.n} tokens")
    return h, w


def slice_signals(signals: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The same tokens (`index` along dim 0) of every signal."""
    return {name: value[index] for name, value in signals.items()}


def emission_ranks(selection: Selection) -> torch.Tensor:
    """(k,) the rank of every kept slot (in `keep` order) in the order the method emits them."""
    k = selection.keep.numel()
    if selection.order is None:
        return torch.arange(k, device=selection.keep.device)
    ranks = torch.empty_like(selection.order)
    ranks[selection.order] = torch.arange(k, device=selection.order.device)
    return ranks


def joined_units(image: ImageTokens, units: list[Unit], chosen: list[Selection]) -> Selection:
    """One image's Selection from the Selections of its units (each indexing its unit's tokens). Emission
    order, where a unit gives one: unit by unit, each in its own order."""
    keeps = [unit.index[c.keep.to(unit.index.device)] for unit, c in zip(units, chosen)]
    keep, by_slot = torch.cat(keeps).sort()
    merged = None
    if any(c.merged is not None for c in chosen):
        rows = [c.merged if c.merged is not None else image.embeds[kept] for c, kept in zip(chosen, keeps)]
        merged = torch.cat(rows)[by_slot]
    order = None
    if any(c.order is not None for c in chosen):
        starts = torch.tensor([0] + [c.keep.numel() for c in chosen]).cumsum(0)
        ranks = torch.cat([int(start) + emission_ranks(c).cpu() for start, c in zip(starts, chosen)])
        order = ranks[by_slot.cpu()].argsort().to(keep.device)
    extra = None
    if any(c.extra is not None for c in chosen):
        flags = [
            c.extra if c.extra is not None else torch.zeros_like(c.keep, dtype=torch.bool) for c in chosen
        ]
        extra = torch.cat([f.to(keep.device) for f in flags])[by_slot]
    return Selection(keep=keep, merged=merged, order=order, extra=extra)
