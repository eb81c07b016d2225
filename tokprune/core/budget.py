"""Budget arithmetic: how many visual tokens of one image (or frame) survive."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from tokprune.errors import BudgetError


@dataclass(frozen=True)
class Budget:
    """Exactly one of `tokens` (kept per image) or `ratio` (kept fraction, rounded up) is set."""

    tokens: int | None = None
    ratio: float | None = None

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
        """Tokens kept out of `n`: `min(tokens, n)` or `ceil(ratio * n)` (never more than `n`)."""
        if self.tokens is not None:
            return min(self.tokens, n)
        return min(n, math.ceil(self.ratio * n - 1e-9))

    def fraction(self, n: int) -> float:
        """The kept fraction for an image of `n` tokens."""
        return self.kept(n) / n if n else 1.0

    def __str__(self) -> str:
        return f"budget={self.tokens}" if self.tokens is not None else f"keep_ratio={self.ratio:g}"


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
