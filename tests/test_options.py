"""Method options are checked when the method is made: every option of every registered method refuses a
value of the wrong kind with a MethodOptionError that names the method and the option (a new method or
option joins automatically)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest

from tokprune.errors import MethodOptionError
from tokprune.methods import REGISTRY, make_method
from tokprune.methods.options import (
    check_bool,
    check_choice,
    check_int,
    check_int_tuple,
    check_llm_layer,
    check_number,
    check_only_with,
    check_ratio_tuple,
    check_vision_layer,
)

OPTIONS = [(name, field.name) for name, cls in sorted(REGISTRY.items()) for field in dataclasses.fields(cls)]
NUMERIC = [
    (name, field.name)
    for name, cls in sorted(REGISTRY.items())
    for field in dataclasses.fields(cls)
    if isinstance(field.default, (int, float)) and not isinstance(field.default, bool)
]


@pytest.mark.parametrize("method, option", OPTIONS, ids=[f"{m}.{o}" for m, o in OPTIONS])
def test_every_option_refuses_a_wrong_kind_of_value(method, option):
    with pytest.raises(MethodOptionError, match=rf"^{method}: {option} must be .*, got <object"):
        make_method(method, {option: object()})


@pytest.mark.parametrize("method, option", NUMERIC, ids=[f"{m}.{o}" for m, o in NUMERIC])
def test_numeric_options_refuse_nan_and_bools(method, option):
    for bad in (math.nan, True):
        with pytest.raises(MethodOptionError, match=f"{method}: {option}"):
            make_method(method, {option: bad})


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_the_defaults_pass_their_own_checks(method):
    assert make_method(method, {}).name == method


@dataclass
class _Options:
    value: object = None
    name: str = "toy"


@pytest.mark.parametrize(
    "kwargs, good, bad",
    [
        ({"low": 0, "high": 1}, [0, 0.5, 1], [-0.1, 1.1, math.inf, math.nan, True, "0.5", None]),
        ({"low": 0, "high": 1, "low_open": True, "high_open": True}, [0.5], [0, 1]),
        ({"low": 0, "low_open": True}, [1e-9, 1e9], [0, -1, math.inf]),
        ({"low": 0, "high": 1, "optional": True}, [None, 1], [2]),
    ],
)
def test_check_number_bounds(kwargs, good, bad):
    for value in good:
        check_number(_Options(value), "value", **kwargs)
    for value in bad:
        with pytest.raises(MethodOptionError, match="toy: value must be"):
            check_number(_Options(value), "value", **kwargs)


def test_check_number_says_the_interval():
    with pytest.raises(MethodOptionError, match=r"must be a number in \[0, 1\), got 2"):
        check_number(_Options(2), "value", 0, 1, high_open=True)
    with pytest.raises(MethodOptionError, match=r"must be None or a finite number > 0, got -1"):
        check_number(_Options(-1), "value", 0, low_open=True, optional=True)


def test_check_int_and_layers():
    check_int(_Options(0), "value", 0)
    for bad in (True, 1.0, -1, "1"):
        with pytest.raises(MethodOptionError, match=r"an int >= 0"):
            check_int(_Options(bad), "value", 0)
    check_vision_layer(_Options(-2), "value")
    check_vision_layer(_Options("object"), "value", named=("object",))
    with pytest.raises(MethodOptionError, match=r"'object' or an int vision-layer index"):
        check_vision_layer(_Options("objects"), "value", named=("object",))
    check_llm_layer(3, 4, "layer", "toy")
    for bad in (0, 4, True, 2.0):
        with pytest.raises(
            MethodOptionError, match=r"toy: layer=.* must be an int in \[1, 3\] for this 4-layer"
        ):
            check_llm_layer(bad, 4, "layer", "toy")


def test_check_choice_bool_and_tuples():
    check_choice(_Options(4), "value", (4, 8))
    with pytest.raises(MethodOptionError, match=r"one of \(1, 4, 8\), got True"):
        check_choice(_Options(True), "value", (1, 4, 8))  # True == 1, but it is not a choice
    check_bool(_Options(False), "value")
    with pytest.raises(MethodOptionError, match="True or False, got 0"):
        check_bool(_Options(0), "value")
    check_int_tuple(_Options((1, 2, 3)), "value", 3)
    for bad in ((1, 2), (1, 2, 3.0), (), "123"):
        with pytest.raises(MethodOptionError, match="3 ints"):
            check_int_tuple(_Options(bad), "value", 3)
    check_ratio_tuple(_Options([0.5, 1]), "value")
    for bad in ((0.5, 0), (1.5,), (), (math.nan,)):
        with pytest.raises(MethodOptionError, match=r"ratios in \(0, 1\]"):
            check_ratio_tuple(_Options(bad), "value")


@pytest.mark.parametrize("method, option", NUMERIC, ids=[f"{m}.{o}" for m, o in NUMERIC])
def test_numpy_numbers_pass_and_are_stored_as_python_numbers(method, option):
    """A value read from a numpy array (np.int64, np.float32, ...) works like the number it equals."""
    default = getattr(make_method(method, {}), option)
    numpy_value = np.int64(default) if isinstance(default, int) else np.float64(default)
    made = make_method(method, {option: numpy_value})
    stored = getattr(made, option)
    assert type(stored) is type(default) and stored == default


def test_numpy_scalars_in_checks():
    options = _Options(np.float32(0.5))
    check_number(options, "value", 0, 1)
    assert type(options.value) is float and options.value == 0.5
    options = _Options(np.int32(8))
    check_choice(options, "value", (4, 8))
    assert type(options.value) is int
    options = _Options([np.int64(1), 2])
    check_int_tuple(options, "value", 2)
    assert options.value == [1, 2] and all(type(x) is int for x in options.value)
    for bad in (np.bool_(True), np.float64(1.0)):
        with pytest.raises(MethodOptionError, match="an int"):
            check_int(_Options(bad), "value")


def test_check_only_with_refuses_options_that_would_be_ignored():
    defaults = {"value": None}
    check_only_with(_Options(None), defaults, False, "mode='x'", "to tune x")  # at its default
    check_only_with(_Options(3), defaults, True, "mode='x'", "to tune x")  # its setting is on
    with pytest.raises(MethodOptionError, match=r"^toy: value is used only with mode='x', to tune x; use "
                       r"mode='x', or leave value=None$"):  # fmt: skip
        check_only_with(_Options(3), defaults, False, "mode='x'", "to tune x")
