"""Unit tests of VTC-CLS (tokprune/methods/vtc_cls.py) on hand-made per-layer [CLS] attention."""

from __future__ import annotations

import pytest
import torch
from checks import assert_valid_keep

import tokprune
from tokprune.core.budget import Budget
from tokprune.errors import MethodOptionError
from tokprune.methods.base import ImageTokens, Method
from tokprune.methods.vtc_cls import VTCCLS


def _image(per_layer: dict[int, torch.Tensor], grid=None) -> ImageTokens:
    n = next(iter(per_layer.values())).numel()
    signals = {f"cls_attention@{i}": v for i, v in per_layer.items()}
    return ImageTokens(embeds=torch.zeros(n, 4), grid=grid, signals=signals)


def test_default_signals_are_the_papers_three_layers_ending_at_the_penultimate():
    m = VTCCLS()  # K = 3 layers counted back from the penultimate one
    assert m.layers == (-4, -3, -2)
    assert m.signals == ("cls_attention@-4", "cls_attention@-3", "cls_attention@-2")
    # the authors' code with its loader's fallback start layer 16 (attentions[16:-1] of 24 layers)
    assert VTCCLS(start_layer=-8).signals == tuple(f"cls_attention@{i}" for i in range(-8, -1))
    assert VTCCLS(start_layer=-3, end_layer=-1).signals == (
        "cls_attention@-3",
        "cls_attention@-2",
        "cls_attention@-1",
    )
    assert VTCCLS(start_layer=16, end_layer=22).signals == tuple(f"cls_attention@{i}" for i in range(16, 23))
    assert VTCCLS(start_layer=-2, end_layer=-2).signals == ("cls_attention@-2",)


def test_keeps_topk_of_the_layer_mean_not_of_any_single_layer():
    # 6 tokens, 3 layers. Each layer's own top-2 differs from the top-2 of the ensemble:
    #   sums = [0.9, 1.0, 1.2, 1.1, 0.3, 0.5], means = sums / 3 -> top-2 = {2, 3}
    layers = {
        -3: torch.tensor([0.6, 0.0, 0.4, 0.3, 0.1, 0.0]),  # top-2 {0, 2}
        -2: torch.tensor([0.3, 0.5, 0.4, 0.0, 0.1, 0.5]),  # top-2 {1, 5}
        -1: torch.tensor([0.0, 0.5, 0.4, 0.8, 0.1, 0.0]),  # top-2 {3, 1}
    }
    method = VTCCLS(start_layer=-3, end_layer=-1)
    image = _image(layers)
    assert torch.allclose(method.scores(image), torch.tensor([0.9, 1.0, 1.2, 1.1, 0.3, 0.5]) / 3)
    assert method.select(image, 2).keep.tolist() == [2, 3]
    assert method.select(image, 3).keep.tolist() == [1, 2, 3]
    assert method.select(image, 4).keep.tolist() == [0, 1, 2, 3]


def test_only_layers_in_the_range_count():
    layers = {i: torch.zeros(5) for i in range(-4, 0)}
    layers[-1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 9.0])  # outside start -4 .. end -2: ignored
    layers[-3] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    method = VTCCLS(start_layer=-4, end_layer=-2)
    assert method.select(_image(layers), 1).keep.tolist() == [1]


def test_default_ignores_layers_outside_the_three_before_the_last():
    # layers -5 and -1 hold a huge spike on token 0 / 4; the default ensemble (-4, -3, -2) must not see it
    layers = {i: torch.zeros(5) for i in range(-5, 0)}
    layers[-5][0] = 9.0
    layers[-1][4] = 9.0
    layers[-4][1], layers[-3][1], layers[-2][3] = 0.5, 0.5, 0.6  # means: token 1 = 1/3, token 3 = 0.2
    method = VTCCLS()
    assert method.select(_image(layers), 1).keep.tolist() == [1]
    assert method.select(_image(layers), 2).keep.tolist() == [1, 3]


@pytest.mark.parametrize("n", [2, 7, 49, 576])
def test_exactly_k_sorted_distinct_against_sum_reference(n):
    g = torch.Generator().manual_seed(n)
    method = VTCCLS()
    layers = {i: torch.rand(n, generator=g).softmax(0) for i in method.layers}
    image = _image(layers)
    # the authors' code sums the layers; with a fixed layer set that ranks exactly like the paper's mean
    total = [sum(float(layers[i][t]) for i in method.layers) for t in range(n)]
    for k in sorted({1, n // 4, n // 2, n - 1} - {0}):
        keep = method.select(image, k).keep
        assert_valid_keep(keep, n, k)
        expected = sorted(sorted(range(n), key=lambda t: (-total[t], t))[:k])
        assert keep.tolist() == expected


def test_ties_break_towards_lower_index_and_half_precision_works():
    method = VTCCLS(start_layer=-2, end_layer=-1)
    image = _image({-2: torch.ones(10, dtype=torch.bfloat16), -1: torch.ones(10, dtype=torch.bfloat16)})
    for k in range(1, 10):
        keep = method.select(image, k).keep
        assert_valid_keep(keep, 10, k)
        assert keep.tolist() == list(range(k))


def test_k_at_least_n_keeps_everything():
    image = _image({i: torch.rand(4) for i in range(-4, -1)})
    assert VTCCLS().select(image, 4).keep.tolist() == [0, 1, 2, 3]


def test_metadata():
    m = VTCCLS()
    assert isinstance(m, Method)
    assert (m.name, m.where, m.default_budget) == ("vtc_cls", "pre", Budget(tokens=64))
    assert "2412.05819" in m.paper
    assert (m.start_layer, m.end_layer) == (-4, -2)
    assert m.code_families == ("llava",)


@pytest.mark.parametrize(
    "options",
    [
        {"start_layer": -1, "end_layer": -2},  # start after end
        {"start_layer": 16, "end_layer": -2},  # mixed signs: the range depends on the depth
        {"start_layer": 5, "end_layer": 3},
        {"start_layer": 1.5},
        {"end_layer": True},
        {"start_layer": "16"},
    ],
)
def test_invalid_options(options):
    with pytest.raises(MethodOptionError):
        VTCCLS(**options)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_runs_end_to_end_on_tiny_models(tiny, family):
    from tiny_models import batch_inputs

    model, proc = tiny(family)
    inputs = batch_inputs(family, proc, (1, 2))
    # the tiny towers have 3 layers: the range -3 .. -1 is every layer
    with tokprune.apply(model, VTCCLS(start_layer=-3, end_layer=-1), keep_ratio=0.25) as pruner:
        model(**inputs)
    stats = pruner.stats
    assert len(stats.visual_kept) == 2
    assert all(0 < kept < total for kept, total in zip(stats.visual_kept, stats.visual_in))
    if family == "llava":  # 7 x 7 tokens per image, ceil(0.25 * 49) = 13 kept each
        assert stats.visual_kept == [13, 26]


@pytest.mark.parametrize("options", [{}, {"start_layer": 0, "end_layer": 3}])
def test_layers_outside_the_tower_fail_at_apply(tiny, options):
    """The docstring's rule: no index wraps around; a layer the 3-layer tower lacks fails in apply()."""
    model, _ = tiny("llava")
    with pytest.raises(MethodOptionError, match="vision tower has 3 layers"):
        tokprune.apply(model, VTCCLS(**options))
    assert not hasattr(model, "_tokprune_pruner")
