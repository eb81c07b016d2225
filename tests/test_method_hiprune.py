"""Unit tests of HiPrune (tokprune/methods/hiprune.py).

Expected sets are written out by hand on small grids, or recomputed by a loop reference that walks
(row, column) coordinates ("grid") or clamps flat offsets one token at a time ("flat", the authors' rule)
independently of the library's tensor arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from checks import assert_valid_keep

import tokprune
from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens, Method
from tokprune.methods.hiprune import HiPrune, flat_neighbours, grid_neighbours, hiprune_parts

OBJ, DEEP = "received_attention@object", "received_attention"


def _image(obj: torch.Tensor, deep: torch.Tensor, grid: tuple[int, int] | None, d: int = 4) -> ImageTokens:
    n = obj.numel()
    return ImageTokens(embeds=torch.zeros(n, d), grid=grid, signals={OBJ: obj, DEEP: deep})


def _random_image(h: int, w: int, seed: int, grid: bool = True) -> ImageTokens:
    g = torch.Generator().manual_seed(seed)
    n = h * w
    return _image(torch.rand(n, generator=g), torch.rand(n, generator=g), (h, w) if grid else None)


def _ref_neighbours(
    tokens: list[int], h: int, w: int, neighbourhood: int = 4, rule: str = "grid"
) -> set[int]:
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if neighbourhood == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = set()
    for t in tokens:
        r, c = divmod(t, w)
        for dr, dc in steps:
            if rule == "flat":  # t + dr * w + dc, clamped to the first / last token
                out.add(min(max(t + dr * w + dc, 0), h * w - 1))
            elif 0 <= r + dr < h and 0 <= c + dc < w:
                out.add((r + dr) * w + (c + dc))
    return out - set(tokens)


def _ref_select(
    obj: list[float], deep: list[float], h: int, w: int, k: int, alpha: float, nb: int, rule: str = "grid"
) -> list[int]:
    """Loop reference: ranks by (-score, index) with plain sorted()."""
    n = h * w
    n_anchors = min(k, round(alpha * k / (1 + nb)))
    by_obj = sorted(range(n), key=lambda i: (-obj[i], i))
    anchors = by_obj[:n_anchors]
    buffers = _ref_neighbours(anchors, h, w, nb, rule)
    room = k - len(anchors)
    buffers = sorted(buffers, key=lambda i: (-obj[i], i))[:room]
    chosen = set(anchors) | set(buffers)
    rest = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-deep[i], i))
    return sorted(chosen | set(rest[: k - len(chosen)]))


# ------------------------------------------------------------------------------------------- parts


def test_buffers_are_the_grid_neighbours_of_hand_placed_anchors():
    h, w = 6, 7
    n = h * w
    obj = torch.full((n,), 0.01)
    obj[0 * w + 6] = 0.9  # end of row 0: its flat index + 1 is the start of row 1, not a neighbour
    obj[3 * w + 3] = 0.8  # interior
    obj[5 * w + 0] = 0.5  # third peak: not an anchor when only two are picked
    deep = torch.linspace(0.0, 1.0, n)  # deep attention grows with the index
    k, alpha = 20, 0.5  # round(0.5 * 20 / 5) = 2 anchors
    anchors, buffers, registers = hiprune_parts(obj, deep, (h, w), k, alpha, neighbours="grid")
    assert anchors.tolist() == [6, 3 * w + 3]
    expected_buffers = {0 * w + 5, 1 * w + 6, 2 * w + 3, 4 * w + 3, 3 * w + 2, 3 * w + 4}
    assert set(buffers.tolist()) == expected_buffers
    assert 1 * w + 0 not in buffers.tolist()  # no wrap-around to the next row
    # registers: the 12 highest deep-attention tokens not already chosen (the last indices)
    chosen = set(anchors.tolist()) | expected_buffers
    expected_registers = [i for i in range(n - 1, -1, -1) if i not in chosen][:12]
    assert sorted(registers.tolist()) == sorted(expected_registers)
    assert anchors.numel() + buffers.numel() + registers.numel() == k


def test_grid_border_anchors_do_not_pull_in_the_corner_tokens():
    # the authors' code clamps index - w and index + w to [0, n - 1]: an anchor in the first row would
    # bring token 0 and one in the last row token n - 1; in the grid they just have three neighbours
    h, w = 5, 5
    obj = torch.zeros(25)
    obj[2] = 1.0  # row 0, column 2
    obj[22] = 0.9  # row 4, column 2
    deep = torch.zeros(25)
    deep[[0, 24]] = -1.0  # the corners are the last choice as registers too
    anchors, buffers, registers = hiprune_parts(
        obj, deep, (h, w), k=10, alpha=1.0, neighbours="grid"
    )  # round(10 / 5) = 2
    assert anchors.tolist() == [2, 22]
    assert buffers.tolist() == [1, 3, 7, 17, 21, 23]
    assert registers.numel() == 2 and not set(registers.tolist()) & {0, 24}


def test_flat_border_anchors_pull_in_the_corner_tokens_as_the_code_does():
    # the default rule is the code's: the first-row anchor's clamped "upper" neighbour is token 0, the
    # last-row anchor's "lower" one token 24
    h, w = 5, 5
    obj = torch.zeros(25)
    obj[2] = 1.0
    obj[22] = 0.9
    deep = torch.zeros(25)
    deep[[0, 24]] = -1.0
    anchors, buffers, registers = hiprune_parts(obj, deep, (h, w), k=10, alpha=1.0)
    assert anchors.tolist() == [2, 22]
    assert buffers.tolist() == [0, 1, 3, 7, 17, 21, 23, 24]
    assert registers.numel() == 0


def test_flat_row_ends_wrap_to_the_next_row():
    h, w = 4, 6
    obj = torch.zeros(24)
    obj[5] = 1.0  # end of row 0
    deep = torch.zeros(24)
    anchors, buffers, _ = hiprune_parts(obj, deep, (h, w), k=5, alpha=1.0)  # 1 anchor
    assert anchors.tolist() == [5]
    assert buffers.tolist() == [0, 4, 6, 11]  # 6 = start of row 1; 0 = clamped 5 - 6
    _, buffers, _ = hiprune_parts(obj, deep, (h, w), k=5, alpha=1.0, neighbours="grid")
    assert buffers.tolist() == [4, 11]


def test_registers_skip_tokens_that_are_already_anchors_or_buffers():
    h, w = 5, 5
    n = h * w
    obj = torch.zeros(n)
    obj[12] = 1.0  # centre anchor; buffers 7, 11, 13, 17
    deep = torch.zeros(n)
    deep[[12, 7, 11, 0, 24, 3]] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    # an interior anchor: both rules give the same buffers
    anchors, buffers, registers = hiprune_parts(obj, deep, (h, w), k=8, alpha=0.7)  # round(1.12) = 1
    assert anchors.tolist() == [12]
    assert buffers.tolist() == [7, 11, 13, 17]
    assert registers.tolist() == [0, 3, 24]  # deep top-3 outside {12, 7, 11, 13, 17}


def test_corner_anchor_has_two_buffers_and_eight_neighbourhood_adds_diagonals():
    h, w = 4, 4
    obj = torch.zeros(16)
    obj[0] = 1.0
    deep = torch.zeros(16)
    grid = {"neighbours": "grid"}
    anchors, buffers, _ = hiprune_parts(obj, deep, (h, w), k=5, alpha=1.0, **grid)  # round(5 / 5) = 1
    assert anchors.tolist() == [0] and buffers.tolist() == [1, 4]
    anchors, buffers, _ = hiprune_parts(obj, deep, (h, w), k=9, alpha=1.0, neighbourhood=8, **grid)
    assert anchors.tolist() == [0] and buffers.tolist() == [1, 4, 5]
    # the code's rule: 0 - 1 and 0 - 4 clamp to 0 itself, so a corner anchor also has 2 buffers; with
    # the diagonals, 0 - 5 and 0 - 3 clamp to 0 too and 0 + 3 is the end of row 0
    _, buffers, _ = hiprune_parts(obj, deep, (h, w), k=5, alpha=1.0)
    assert buffers.tolist() == [1, 4]
    _, buffers, _ = hiprune_parts(obj, deep, (h, w), k=9, alpha=1.0, neighbourhood=8)
    assert buffers.tolist() == [1, 3, 4, 5]


def test_no_grid_is_a_strip_with_left_and_right_buffers():
    n = 12
    obj = torch.zeros(n)
    obj[5] = 1.0
    deep = torch.arange(n, dtype=torch.float32)
    image = _image(obj, deep, None)
    keep = HiPrune(alpha=1.0, neighbours="grid").select(image, 5).keep  # 1 anchor, 2 buffers, 2 registers
    assert keep.tolist() == [4, 5, 6, 10, 11]
    # flat on a 1 x 12 strip (w = 12): 5 -/+ 12 clamp to the ends
    assert HiPrune(alpha=1.0).select(image, 5).keep.tolist() == [0, 4, 5, 6, 11]


def test_published_anchor_counts_on_the_llava_grid():
    image = _random_image(24, 24, seed=0)
    obj, deep = image.signals[OBJ], image.signals[DEEP]
    for k, n_anchors in ((64, 1), (128, 3), (192, 4)):
        anchors, buffers, registers = hiprune_parts(obj, deep, (24, 24), k, alpha=0.1)
        assert anchors.numel() == n_anchors
        assert anchors.tolist() == sorted(torch.topk(obj, n_anchors).indices.tolist())
        assert set(buffers.tolist()) == _ref_neighbours(anchors.tolist(), 24, 24, rule="flat")
        assert anchors.numel() + buffers.numel() + registers.numel() == k


def test_overfull_buffers_are_trimmed_by_object_attention():
    h, w = 5, 5
    obj = torch.zeros(25)
    obj[12] = 1.0
    obj[[7, 11, 13, 17]] = torch.tensor([0.1, 0.4, 0.3, 0.2])
    deep = torch.rand(25, generator=torch.Generator().manual_seed(1))
    # k = 3, alpha = 1: round(3 / 5) = 1 anchor; 4 buffers do not fit in the 2 places left
    anchors, buffers, registers = hiprune_parts(obj, deep, (h, w), k=3, alpha=1.0)  # interior: any rule
    assert anchors.tolist() == [12]
    assert buffers.tolist() == [11, 13]
    assert registers.numel() == 0


def test_alpha_zero_is_deep_layer_topk():
    image = _random_image(6, 9, seed=3)
    keep = HiPrune(alpha=0.0).select(image, 17).keep
    assert keep.tolist() == sorted(torch.topk(image.signals[DEEP], 17).indices.tolist())


def test_grid_neighbours_helper_matches_loop_reference():
    g = torch.Generator().manual_seed(5)
    for h, w in ((1, 9), (9, 1), (3, 4), (7, 5)):
        tokens = torch.randperm(h * w, generator=g)[: max(1, h * w // 4)]
        for nb in (4, 8):
            got = grid_neighbours(tokens, h, w, nb).tolist()
            assert got == sorted(_ref_neighbours(tokens.tolist(), h, w, nb))
            got = flat_neighbours(tokens, h, w, nb).tolist()
            assert got == sorted(_ref_neighbours(tokens.tolist(), h, w, nb, rule="flat"))


# ------------------------------------------------------------------------------------------ select


@pytest.mark.parametrize("h, w", [(1, 10), (3, 3), (4, 6), (7, 5), (24, 24)])
@pytest.mark.parametrize("alpha, nb", [(0.1, 4), (0.5, 4), (1.0, 4), (1.0, 8), (0.3, 8)])
@pytest.mark.parametrize("rule", ["flat", "grid"])
def test_exactly_k_sorted_distinct_and_matches_reference(h, w, alpha, nb, rule):
    n = h * w
    image = _random_image(h, w, seed=h * 31 + w)
    method = HiPrune(alpha=alpha, neighbourhood=nb, neighbours=rule)
    obj, deep = image.signals[OBJ].tolist(), image.signals[DEEP].tolist()
    for k in sorted({1, 2, 3, 5, n // 3, n // 2, n - 2, n - 1} - {0}):
        if not 1 <= k < n:
            continue
        keep = method.select(image, k).keep
        assert_valid_keep(keep, n, k)
        assert keep.tolist() == _ref_select(obj, deep, h, w, k, alpha, nb, rule)


def test_ties_and_float16_signals_still_give_k():
    h, w = 6, 6
    image = _image(torch.ones(36, dtype=torch.float16), torch.zeros(36, dtype=torch.float16), (h, w))
    for k in range(1, 36):
        assert_valid_keep(HiPrune(alpha=1.0).select(image, k).keep, 36, k)


def test_k_at_least_n_keeps_everything():
    image = _random_image(3, 3, seed=0)
    assert HiPrune().select(image, 9).keep.tolist() == list(range(9))


def test_bad_grid_raises():
    image = _random_image(3, 4, seed=0)
    image.grid = (5, 5)
    with pytest.raises(ValueError):
        HiPrune().select(image, 4)


# ------------------------------------------------------------------------------------ metadata


def test_metadata_and_signals():
    m = HiPrune()
    assert isinstance(m, Method)
    assert (m.name, m.where, m.default_budget) == ("hiprune", "pre", Budget(tokens=64))
    assert "2508.00553" in m.paper
    assert m.signals == ("received_attention@object", "received_attention")
    assert HiPrune(object_layer=8).signals == ("received_attention@8", "received_attention")
    assert HiPrune(object_layer=8, deep_layer=-1).signals == ("received_attention@8", "received_attention@-1")
    assert HiPrune(object_layer=-1, deep_layer=-1).signals == ("received_attention@-1",)
    assert m.neighbours == "flat" and m.neighbourhood == 4


@pytest.mark.parametrize(
    "options",
    [
        {"alpha": -0.1},
        {"alpha": 1.5},
        {"alpha": True},
        {"object_layer": "middle"},
        {"object_layer": 2.0},
        {"deep_layer": "last"},
        {"neighbourhood": 6},
        {"neighbours": "2d"},
        {"neighbours": None},
    ],
)
def test_invalid_options(options):
    with pytest.raises(MethodOptionError):
        HiPrune(**options)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_runs_end_to_end_on_tiny_models(tiny, family):
    from tiny_models import batch_inputs

    model, proc = tiny(family)
    inputs = batch_inputs(family, proc, (1, 2))
    with tokprune.apply(model, HiPrune(), keep_ratio=0.25) as pruner:
        model(**inputs)
    stats = pruner.stats
    assert len(stats.visual_kept) == 2
    assert all(0 < kept < total for kept, total in zip(stats.visual_kept, stats.visual_in))
    if family == "llava":  # 7 x 7 tokens per image, ceil(0.25 * 49) = 13 kept each
        assert stats.visual_kept == [13, 26]
