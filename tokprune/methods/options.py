"""Checks of method options: a bad value fails when the method is made, with one `MethodOptionError`
that names the method, the option, what it must be and what it got.

Every check reads `getattr(method, option)` and uses `method.name` in the message, so a method's
`__post_init__` is a list of one-line calls. Booleans never pass as numbers (`True` is not a layer).
Checks that need the model (a layer index against the LLM's depth) happen later, in `boundaries`.
Numbers of other numeric types (numpy scalars, `fractions.Fraction`) pass and are stored as the plain
int or float they equal, so options print, compare and serialise as Python numbers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from tokprune.errors import MethodOptionError


def _fail(method, option: str, must: str, optional: bool) -> None:
    value = getattr(method, option)
    what = f"None or {must}" if optional else must
    raise MethodOptionError(f"{method.name}: {option} must be {what}, got {value!r}")


def _is_number(value) -> bool:
    return is_real(value) and math.isfinite(value)


def is_real(value) -> bool:
    """A real number (int, float, numpy scalar, ...) that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
    """An integer (int, numpy integer, ...) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def plain(value):
    """The Python int or float a checked number equals (itself if it is one already)."""
    if type(value) in (int, float):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _store_plain(method, option: str) -> None:
    value = getattr(method, option)
    if isinstance(value, (list, tuple)):
        setattr(method, option, type(value)(plain(x) for x in value))
    elif value is not None and not isinstance(value, str):
        setattr(method, option, plain(value))


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """The interval in the usual notation: interval(0, 1, high_open=True) -> '[0, 1)'."""
    return f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_number(
    method,
    option: str,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """A finite int or float in the interval from `low` to `high` (closed unless `*_open`)."""
    value = getattr(method, option)
    if optional and value is None:
        return
    ok = _is_number(value)
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        if math.isinf(high) and math.isinf(low):
            must = "a finite number"
        elif math.isinf(high):
            must = f"a finite number {'>' if low_open else '>='} {low}"
        else:
            must = f"a number in {interval(low, high, low_open, high_open)}"
        _fail(method, option, must, optional)
    _store_plain(method, option)


def check_int(method, option: str, low: int | None = None, *, optional: bool = False) -> None:
    """An int (not a bool), at least `low` when given."""
    value = getattr(method, option)
    if optional and value is None:
        return
    if not is_int(value) or (low is not None and value < low):
        must = "an int" if low is None else ("a positive int" if low == 1 else f"an int >= {low}")
        _fail(method, option, must, optional)
    _store_plain(method, option)


def check_vision_layer(method, option: str, *, optional: bool = False, named: tuple[str, ...] = ()) -> None:
    """A ViT layer index: an int, negative counting from the end (whether the tower has it is checked
    when the signal is read), or one of the method's `named` layers (strings)."""
    value = getattr(method, option)
    if (optional and value is None) or (isinstance(value, str) and value in named):
        return
    if not is_int(value):
        names = "".join(f"{name!r} or " for name in named)
        _fail(method, option, f"{names}an int vision-layer index (negative from the end)", optional)
    _store_plain(method, option)


def check_llm_layer(layer, num_layers: int, option: str, method: str) -> None:
    """An LLM layer at which visual tokens can be dropped: an int in [1, num_layers - 1] (layer 0 sees
    the input, and the last layer has no later layer to prune for)."""
    if not is_int(layer) or not 1 <= layer < num_layers:
        raise MethodOptionError(
            f"{method}: {option}={layer!r} must be an int in [1, {num_layers - 1}] for this {num_layers}-layer LLM"
        )


def check_choice(method, option: str, choices: Sequence) -> None:
    """One of `choices`: a string as it is, a number of the same kind (an integer for an int choice, never
    a bool, so True does not stand for 1)."""
    value = getattr(method, option)

    def same(choice) -> bool:  # is_int is False for bools, so a bool matches only a bool choice
        if is_int(choice):
            return is_int(value) and value == choice
        return type(value) is type(choice) and value == choice

    if not any(same(c) for c in choices):
        _fail(method, option, f"one of {tuple(choices)}", False)
    _store_plain(method, option)


def check_bool(method, option: str) -> None:
    """True or False."""
    if not isinstance(getattr(method, option), bool):
        _fail(method, option, "True or False", False)


def check_int_tuple(method, option: str, length: int | None = None, *, optional: bool = True) -> None:
    """A non-empty list or tuple of ints, of `length` entries when given (one per stage)."""
    value = getattr(method, option)
    if optional and value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(is_int(x) for x in value)
    if not ok or (length is not None and len(value) != length):
        count = f"{length} ints" if length is not None else "a non-empty tuple of ints"
        _fail(method, option, f"{count} (one per stage)", optional)
    _store_plain(method, option)


def check_ratio_tuple(method, option: str, *, optional: bool = True) -> None:
    """A non-empty list or tuple of keep ratios in (0, 1] (one per stage)."""
    value = getattr(method, option)
    if optional and value is None:
        return
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if not ok or not all(_is_number(r) and 0 < r <= 1 for r in value):
        _fail(method, option, "a non-empty tuple of ratios in (0, 1] (one per stage)", optional)
    _store_plain(method, option)


def check_only_with(method, defaults: dict, active: bool, setting: str, why: str) -> None:
    """Options that act only under `setting` (e.g. "recycle=True"): when `active` is False, giving any of
    them a value other than its default (in `defaults`, option -> default) fails instead of being ignored.
    `why` says what the options do there ("to size ..."), for the message."""
    changed = [option for option, default in defaults.items() if getattr(method, option) != default]
    if changed and not active:
        names = " and ".join(changed)
        left = ", ".join(f"{option}={defaults[option]!r}" for option in changed)
        raise MethodOptionError(
            f"{method.name}: {names} {'is' if len(changed) == 1 else 'are'} used only with {setting}, {why}; "
            f"use {setting}, or leave {left}"
        )
