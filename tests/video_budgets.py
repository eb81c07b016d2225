"""What every stage keeps of images and video clips under `video_budget`, written from the rule (DESIGN §3,
README "budget"), not from tokprune's code: with "frame" a token budget counts per frame, so a clip of t
frames gets t times every token budget of the configuration (the final one, the earlier stages of a
multi-stage method that follow from it, the defaults of earlier methods of a composition); with "clip" it
gets the budget as is; a ratio is the same fraction of the clip in both modes. The stage counts then come
from the methods' own arithmetic (`reference.stage_plan`)."""

from __future__ import annotations

from types import SimpleNamespace

from reference import stage_plan

from tokprune.core.budget import Budget
from tokprune.methods.base import ScaledBudget

VIDEO_BUDGETS = ("frame", "clip")
# a pre-LLM method (its default, 64 per image / frame, keeps the tiny items whole), then two in-LLM methods:
# fastv keeps half of every item, the user's budget sets dart, counted on the tokens fastv left
COMPOSITION = ["visionzip", ("fastv", {"layer": 1}), ("dart", {"layer": 3})]


def clip_budget(budget: Budget, frames: int, video_budget: str) -> Budget:
    """The budget of an item of `frames` video frames (0 for an image) under `video_budget`."""
    if video_budget == "clip" or frames <= 1:
        return budget
    if isinstance(budget, ScaledBudget):  # an earlier stage: a factor times the final count
        return ScaledBudget(final=clip_budget(budget.final, frames, video_budget), factor=budget.factor)
    return Budget(tokens=budget.tokens * frames) if budget.tokens is not None else budget


def expected_stage_kept(pruner, items: list[tuple[int, int, int, int]], n_layers: int, video_budget: str):
    """Per installed stage, per batch row: the visual tokens left after it.

    items: (row, LLM tokens, content tokens, frames) of every image / clip; an item pruned below its content
    loses its separators (LLaVA-OneVision's newline tokens), an item kept whole keeps all its LLM tokens.
    """
    plans = []
    for _, _, content, frames in items:
        budgets = [clip_budget(b, frames, video_budget) for b in pruner.budgets]
        _, stages = stage_plan(SimpleNamespace(methods=pruner.methods, budgets=budgets), [content], n_layers)
        plans.append([counts[0] for counts in stages])
    rows = max(row for row, *_ in items) + 1
    return [
        [
            sum(
                k[s] if k[s] < content else full for (r, full, content, _), k in zip(items, plans) if r == row
            )
            for row in range(rows)
        ]
        for s in range(len(plans[0]))
    ]
