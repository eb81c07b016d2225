"""DART: pivots by key L1 norm, then per pivot the image tokens least similar to it (hand-made cases).

The general loop reference and the image-only cases live in tests/test_methods.py; these add the text
pivots, the two pivot orders (the code's set order from positions, and the norm order it falls back to),
the L1 criterion, the small-budget / few-instruction-token rules, the two quotas and the option errors.
The agreement with the authors' code is tests/agreement/test_dart.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_valid_keep

from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens
from tokprune.methods.dart import DART, set_visit_order

KEYS = "keys_from_start"  # the default key signal (key_positions="row")


def _circle(degrees: list[float]) -> torch.Tensor:
    """Unit vectors in the plane at the given angles, scaled by 2 (cosine ignores the scale)."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return (torch.stack([radians.cos(), radians.sin()], dim=1) * 2).float()


# image tokens: index -> angle of its hidden state; token 3 has the largest key norm (the image pivot)
ANGLES = [10, 178, 80, 0, 280, 160, 262, 95, 197, 210]


def _image(text_angle: float | None = None) -> ImageTokens:
    keys = torch.full((10, 4), 0.1)
    keys[3] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # L1 4: the image pivot (hidden state at 0 deg)
    text = {}
    if text_angle is not None:
        text_keys = torch.tensor([[0.1, 0.1, 0.1, 0.1], [2.0, 0.0, 0.0, -2.0], [0.5, 0.0, 0.0, 0.0]])
        text_hidden = _circle([45.0, text_angle, 300.0])  # text token 1 (L1 4) is the text pivot
        text = {KEYS: text_keys, "hidden": text_hidden}
    return ImageTokens(
        embeds=torch.randn(10, 6), grid=None, signals={KEYS: keys, "hidden": _circle(ANGLES)}, text=text
    )


def test_text_pivot_takes_a_share_and_is_not_kept():
    # pivots=2: one image pivot (0 deg) and one text pivot (90 deg); k=5 -> 4 slots, 2 per pivot.
    # The image pivot keeps the two tokens least similar to 0 deg: 178 (1), 197 (8); the text pivot then
    # keeps, among the rest, the two least similar to 90 deg: 262 (6), 280 (4).
    image = _image(text_angle=90.0)
    keep = DART(pivots=2, pivot_order="norm").select(image, 5).keep
    assert keep.tolist() == [1, 3, 4, 6, 8]
    assert_valid_keep(keep, 10, 5)


def test_image_pivots_take_their_shares_before_text_pivots():
    # k=4 -> 3 slots over 2 pivots: the first pivot in the order (the image pivot) takes 2, the text pivot 1.
    # The other order would keep 262 and 280 for the text pivot and only 178 for the image pivot.
    keep = DART(pivots=2, pivot_order="norm").select(_image(text_angle=90.0), 4).keep
    assert keep.tolist() == [1, 3, 6, 8]


def test_pivots_by_l1_norm_of_keys():
    keys = torch.zeros(4, 4)
    keys[0] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # L1 3, L2 3
    keys[2] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # L1 4, L2 2: the pivot under the L1 norm
    image = ImageTokens(
        embeds=torch.randn(4, 3), grid=None, signals={KEYS: keys, "hidden": _circle([0, 90, 180, 270])}
    )
    assert DART(pivots=1, pivot_order="norm").select(image, 1).keep.tolist() == [2]


def test_few_instruction_tokens_and_small_budgets():
    g = torch.Generator().manual_seed(0)
    n = 20
    keys = torch.randn(n, 8, generator=g)
    by_norm = keys.abs().sum(-1).argsort(descending=True)
    hidden = torch.randn(n, 5, generator=g)
    one_text = {KEYS: torch.randn(1, 8, generator=g), "hidden": torch.randn(1, 5, generator=g)}
    image = ImageTokens(embeds=hidden, grid=None, signals={KEYS: keys, "hidden": hidden}, text=one_text)
    # 8 pivots but a single instruction token: 7 image pivots, all kept when k = 7
    assert DART(pivots=8, pivot_order="norm").select(image, 7).keep.tolist() == sorted(by_norm[:7].tolist())
    # a budget below the number of image pivots keeps the largest key norms only
    assert DART(pivots=8, pivot_order="norm").select(image, 3).keep.tolist() == sorted(by_norm[:3].tolist())
    # the kept count is always exactly k: the image pivots count towards the budget
    for k in (8, 12, 19):
        assert_valid_keep(DART(pivots=8, pivot_order="norm").select(image, k).keep, n, k)


# ------------------------------------------------------------------------------- the code's visit order


def test_set_visit_order_is_cpythons_set_order():
    assert set_visit_order([7, 1]) == [1, 0]  # slots 7 and 1 of an 8-slot table: 1 first
    positions = [615, 40, 598, 77, 640, 633, 651, 612]  # 4 image pivots, then 4 text pivots
    assert [positions[i] for i in set_visit_order(positions)] == list(set(positions))


def test_pivot_order_set_follows_the_positions():
    # as test_image_pivots_take_their_shares_before_text_pivots, but the text pivot's position (1) comes
    # before the image pivot's (7) in the set, so the text pivot takes the larger share: 262 (6), 280 (4);
    # the image pivot then 178 (1)
    image = _image(text_angle=90.0)
    image.signals["position"] = torch.arange(10) + 4  # token 3 (the image pivot) at 7
    image.text["position"] = torch.tensor([0, 1, 2])  # text token 1 (the text pivot) at 1
    assert DART(pivots=2).select(image, 4).keep.tolist() == [1, 3, 4, 6]
    assert DART(pivots=2, pivot_order="norm").select(image, 4).keep.tolist() == [1, 3, 6, 8]


def test_signals_ask_for_positions_only_for_the_set_order():
    assert "position" in DART().signals
    assert DART(pivot_order="norm").signals == (KEYS, "hidden")
    assert DART(pivot_order="norm", key_positions="given").signals == ("keys", "hidden")


# ------------------------------------------------------------------------------------------ the counts


@pytest.mark.parametrize(
    ("n", "budget", "code", "exact"),
    [
        (576, 128, 132, 128),
        (576, 64, 68, 64),
        (576, 100, 100, 100),
        (576, 5, 4, 5),
        (10, 128, 10, 10),
        (13, 13, 13, 13),
        (13, 12, 12, 12),
    ],
)
def test_code_quota_keeps_the_pivots_on_top(n, budget, code, exact):
    assert DART().stage_counts(n, Budget(tokens=budget)) == [code]
    assert DART(quota="exact").stage_counts(n, Budget(tokens=budget)) == [exact]


@pytest.mark.parametrize(
    "options", [{"quota": "paper"}, {"quota": 1}, {"pivot_order": "sorted"}, {"pivot_order": None}]
)
def test_option_errors(options):
    with pytest.raises(MethodOptionError, match="dart"):
        DART(**options)
