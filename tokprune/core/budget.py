"""Budget arithmetic: how many visual tokens of one image (or video clip) survive.

The budget unit (DESIGN §3): `budget` counts tokens kept per image, and per *frame* for video. A clip of
t frames (units of kind "frame" in the layout; on Qwen-VL a frame is one temporal slice of the LLM tokens)
therefore keeps min(budget * t, n) tokens with `video_budget="frame"` (the default) and min(budget, n) with
`video_budget="clip"`. `keep_ratio` is the same fraction either way: ceil(keep_ratio * n) over the whole
clip's content tokens (one rounding per clip, not one per frame). `Budget.per_item` is the only place that
applies the rule; the engine calls it for every image or clip before asking a method for its counts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

from tokprune.errors import BudgetError

# how `budget` counts a video clip: per frame (DESIGN §3) or per clip
VIDEO_BUDGETS = ("frame", "clip")


def check_video_budget(video_budget: object) -> str:
    """`video_budget` if it is one of VIDEO_BUDGETS, else a BudgetError that lists them."""
    if not isinstance(video_budget, str) or video_budget not in VIDEO_BUDGETS:
        raise BudgetError(
            f"video_budget must be 'frame' (budget = tokens kept per video frame, the default) or 'clip' "
            f"(budget = tokens kept per whole clip), got {video_budget!r}"
        )
    return video_budget


@dataclass(frozen=True)
class Budget:
    """Exactly one of `tokens` (kept per image) or `ratio` (kept fraction, rounded up) is set.

    video: how `tokens` counts a video clip, "frame" (tokens per frame) or "clip" (tokens per clip); see
    `per_item`. It never changes a ratio.
    """

    tokens: int | None = None
    ratio: float | None = None
    video: str = "frame"

    @classmethod
    def from_args(cls, budget: int | None, keep_ratio: float | None, default: Budget) -> Budget:
        """Validate the user's `budget`/`keep_ratio`; fall back to the method's published default."""
        if budget is not None and keep_ratio is not None:
            raise BudgetError(
                f"give either budget (tokens kept per image) or keep_ratio (fraction kept), not both; "
                f"got budget={budget!r}, keep_ratio={keep_ratio!r}"
            )
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
                raise BudgetError(
                    f"budget must be a positive int (visual tokens kept per image), got {budget!r}"
                )
            return cls(tokens=int(budget))
        if keep_ratio is not None:
            if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, numbers.Real):
                raise BudgetError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
            if not 0.0 < float(keep_ratio) <= 1.0:
                raise BudgetError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
            return cls(ratio=float(keep_ratio))
        return default

    def kept(self, n: int) -> int:
        """Tokens kept out of `n`: `min(tokens, n)` or `ceil(ratio * n)`, at least 1 and never more than `n`
        (a ratio however small keeps one token, as a budget of 1 does; an empty image keeps none)."""
        if self.tokens is not None:
            return min(self.tokens, n)
        return min(n, max(1, math.ceil(self.ratio * n - 1e-9)))

    def fraction(self, n: int) -> float:
        """The kept fraction for an image of `n` tokens."""
        return self.kept(n) / n if n else 1.0

    def with_video(self, video_budget: str) -> Budget:
        """This budget counting clips per `video_budget` ("frame" or "clip"), nested budgets included (the
        final budget a `ScaledBudget` of an earlier stage follows)."""
        changes = {name: value.with_video(video_budget) for name, value in self._nested()}
        return replace(self, video=check_video_budget(video_budget), **changes)

    def per_item(self, frames: int) -> Budget:
        """The budget of one image or clip of `frames` video frames (0 for an image): with video="frame" a
        token budget is multiplied by the frames, so the clip keeps min(tokens * frames, n); a ratio, a
        budget per clip and an image or one-frame clip keep this budget. Nested budgets (a `ScaledBudget`'s
        final) follow, so every earlier stage of a multi-stage method scales with its final count."""
        if frames <= 1:
            return self
        changes: dict[str, object] = {name: value.per_item(frames) for name, value in self._nested()}
        if self.tokens is not None and self.video == "frame":
            changes["tokens"] = self.tokens * frames
        return replace(self, **changes) if changes else self

    def _nested(self) -> list[tuple[str, Budget]]:
        """(field name, value) of the fields that hold a Budget (subclasses' `final`)."""
        return [(f.name, v) for f in fields(self) if isinstance(v := getattr(self, f.name), Budget)]

    def __str__(self) -> str:
        if self.tokens is None:
            return f"keep_ratio={self.ratio:g}"
        return f"budget={self.tokens}" + (" per clip" if self.video == "clip" else "")


@dataclass(frozen=True, kw_only=True)
class AdaptiveBudget(Budget):
    """The method decides every image's count from the image itself (PruMerge's IQR outliers of the [CLS]
    attention): the engine asks `Method.adaptive_count(image)` instead of computing a count from n, so
    `kept(n)` is only its upper bound n. `rule` names the method's rule for the catalogue. Pre-LLM methods
    only, as their default budget; an explicit budget / keep_ratio replaces it with a fixed count."""

    rule: str = ""

    def __post_init__(self) -> None:
        if self.tokens is not None or self.ratio is not None:
            raise TypeError("AdaptiveBudget takes only rule= (a keyword)")

    def kept(self, n: int) -> int:
        return n

    def per_item(self, frames: int) -> Budget:
        return self

    def __str__(self) -> str:
        return f"adaptive ({self.rule})" if self.rule else "adaptive"


def split_budget(k: int, sizes: list[int]) -> list[int]:
    """Share k kept tokens among units of `sizes` in proportion to their sizes (largest remainder).

    Every share is at most its unit's size and the shares sum to min(k, sum(sizes)); ties in the
    remainders go to the earlier unit, so the split is deterministic.
    """
    total = sum(sizes)
    k = min(k, total)
    if total == 0:
        return [0] * len(sizes)
    exact = [k * size / total for size in sizes]
    shares = [min(size, math.floor(e)) for size, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order:
        if sum(shares) >= k:
            break
        if shares[i] < sizes[i]:
            shares[i] += 1
    return shares
