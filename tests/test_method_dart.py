"""DART: pivots by key L1 norm, then per pivot the image tokens least similar to it (hand-made cases).

The general loop reference and the image-only cases live in tests/test_methods.py; these add the text
pivots, the fixed pivot order, the L1 criterion and the small-budget / few-instruction-token rules.
"""

from __future__ import annotations

import math

import torch
from checks import assert_valid_keep

from tokprune.methods.base import ImageTokens
from tokprune.methods.dart import DART


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
        text = {"keys": text_keys, "hidden": text_hidden}
    return ImageTokens(
        embeds=torch.randn(10, 6), grid=None, signals={"keys": keys, "hidden": _circle(ANGLES)}, text=text
    )


def test_text_pivot_takes_a_share_and_is_not_kept():
    # pivots=2: one image pivot (0 deg) and one text pivot (90 deg); k=5 -> 4 slots, 2 per pivot.
    # The image pivot keeps the two tokens least similar to 0 deg: 178 (1), 197 (8); the text pivot then
    # keeps, among the rest, the two least similar to 90 deg: 262 (6), 280 (4).
    image = _image(text_angle=90.0)
    keep = DART(pivots=2).select(image, 5).keep
    assert keep.tolist() == [1, 3, 4, 6, 8]
    assert_valid_keep(keep, 10, 5)


def test_image_pivots_take_their_shares_before_text_pivots():
    # k=4 -> 3 slots over 2 pivots: the first pivot in the order (the image pivot) takes 2, the text pivot 1.
    # The other order would keep 262 and 280 for the text pivot and only 178 for the image pivot.
    keep = DART(pivots=2).select(_image(text_angle=90.0), 4).keep
    assert keep.tolist() == [1, 3, 6, 8]


def test_pivots_by_l1_norm_of_keys():
    keys = torch.zeros(4, 4)
    keys[0] = torch.tensor([3.0, 0.0, 0.0, 0.0])  # L1 3, L2 3
    keys[2] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # L1 4, L2 2: the pivot under the L1 norm
    image = ImageTokens(
        embeds=torch.randn(4, 3), grid=None, signals={"keys": keys, "hidden": _circle([0, 90, 180, 270])}
    )
    assert DART(pivots=1).select(image, 1).keep.tolist() == [2]


def test_few_instruction_tokens_and_small_budgets():
    g = torch.Generator().manual_seed(0)
    n = 20
    keys = torch.randn(n, 8, generator=g)
    by_norm = keys.abs().sum(-1).argsort(descending=True)
    hidden = torch.randn(n, 5, generator=g)
    one_text = {"keys": torch.randn(1, 8, generator=g), "hidden": torch.randn(1, 5, generator=g)}
    image = ImageTokens(embeds=hidden, grid=None, signals={"keys": keys, "hidden": hidden}, text=one_text)
    # 8 pivots but a single instruction token: 7 image pivots, all kept when k = 7
    assert DART(pivots=8).select(image, 7).keep.tolist() == sorted(by_norm[:7].tolist())
    # a budget below the number of image pivots keeps the largest key norms only
    assert DART(pivots=8).select(image, 3).keep.tolist() == sorted(by_norm[:3].tolist())
    # the kept count is always exactly k: the image pivots count towards the budget
    for k in (8, 12, 19):
        assert_valid_keep(DART(pivots=8).select(image, k).keep, n, k)
