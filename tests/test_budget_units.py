"""The budget unit of a video clip (`Budget.per_item`): a token budget counts per frame with
video_budget="frame" and per clip with "clip"; a ratio is the same fraction of the clip either way; the
earlier stages of a multi-stage method (`ScaledBudget`) follow the clip's final count."""

import math

import pytest

from tokprune.core.budget import Budget, check_video_budget
from tokprune.errors import BudgetError
from tokprune.methods.base import ScaledBudget


@pytest.mark.parametrize(
    ("frames", "n", "frame_kept", "clip_kept"), [(0, 49, 5, 5), (1, 16, 5, 5), (4, 64, 20, 5), (4, 12, 12, 5)]
)
def test_tokens_count_per_frame_or_per_clip(frames, n, frame_kept, clip_kept):
    """An image (0 frames) or a one-frame clip keeps min(5, n); a clip of t frames min(5t, n) or min(5, n)."""
    budget = Budget(tokens=5)
    assert budget.per_item(frames).kept(n) == frame_kept
    assert budget.with_video("frame").per_item(frames).kept(n) == frame_kept
    assert budget.with_video("clip").per_item(frames).kept(n) == clip_kept


def test_a_ratio_is_the_same_fraction_of_the_clip_rounded_once():
    """ceil(0.3 * 4 * 9) = 11 over the clip, not 4 * ceil(0.3 * 9) = 12 summed over frames."""
    for video_budget in ("frame", "clip"):
        budget = Budget(ratio=0.3).with_video(video_budget).per_item(4)
        assert budget.kept(36) == math.ceil(0.3 * 36) == 11


def test_earlier_stages_follow_the_clips_final_count():
    stage = ScaledBudget(final=Budget(tokens=5), factor=2.0)  # e.g. MustDrop's vision stage: 2 x final
    assert stage.per_item(3).kept(100) == 30 and stage.per_item(3).final.kept(100) == 15
    assert stage.with_video("clip").per_item(3).kept(100) == 10
    assert stage.per_item(3).kept(20) == 20  # never more than the clip holds
    assert str(Budget(tokens=5).with_video("clip")) == "budget=5 per clip"


@pytest.mark.parametrize("value", ["frames", "", None, 1])
def test_unknown_units_are_refused(value):
    with pytest.raises(BudgetError, match="video_budget must be"):
        check_video_budget(value)
    with pytest.raises(BudgetError):
        Budget(tokens=5).with_video(value)
