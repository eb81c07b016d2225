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

    embeds: (n, D) the tokens' current hidden states (LLM input embeddings for pre-LLM methods).
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

    keep: (k,) sorted LongTensor of kept local indices.
    merged: (k, D) replacement embeddings of the kept tokens (merging methods), or None (pure pruning).
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None


@dataclass
class Method:
    """Base of every method. Subclasses are dataclasses whose fields are the method's options.

    Class attributes describe the method for the registry and the engine:
      name: registry name; family: the kind of method the catalogue lists it under ("[CLS] attention",
          "diversity", ...); where: "pre" (before the LLM) or "llm" (inside the LLM);
      signals: names of the per-token signals `select` reads from `ImageTokens.signals`;
      default_budget: the published default when neither budget nor keep_ratio is given;
      paper: the citation shown by the catalogue;
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
    spatial: ClassVar[bool] = False
    needs_tiles: ClassVar[bool] = False

    def select(self, image: ImageTokens, k: int) -> Selection:
        """Choose `k` < image.n tokens of one image. Must return exactly k sorted indices."""
        raise NotImplementedError


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
    """

    where: ClassVar[str] = "llm"
    score_at: ClassVar[str] = "previous"
    counts_on_image: ClassVar[bool] = False

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
