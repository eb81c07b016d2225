"""The plugin's model arguments: what `--model_args key=value,...` means for `--model tokprune`.

Known keys configure the run (`RunArgs`); every other key is a method option passed on to
`tokprune.apply`. lmms-eval has already turned "true"/"false", integers and floats into Python values;
`option_value` finishes the job for strings ("[8,16,24]" -> (8, 16, 24), "none" -> None).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

from tokprune.errors import MethodOptionError

NO_METHOD = ("", "none", "unpruned", "baseline")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelArgsError(MethodOptionError):
    """A model argument of the lmms-eval plugin is missing, malformed or conflicting."""


@dataclass
class RunArgs:
    """How the plugin loads, prunes and runs the model.

    pretrained: HF id, local folder, or "toy" (the packaged toy weights); None when a model is given.
    method: registered tokprune method names (several = composition); empty = unpruned.
    budget / keep_ratio: passed to `tokprune.apply` (at most one). options: the method's own options.
    attn_implementation / dtype: how a checkpoint is loaded (None: sdpa; "auto": the checkpoint's dtype);
    applied to a model passed in already built when set (None / "auto": it keeps its own).
    max_new_tokens: overrides the task's generation_kwargs when set.
    """

    pretrained: str | None = None
    method: list[str] = field(default_factory=list)
    budget: int | None = None
    keep_ratio: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str | None = None
    dtype: str = "auto"
    device: str | None = None
    batch_size: int = 1
    max_new_tokens: int | None = None

    @property
    def pruned(self) -> bool:
        return bool(self.method)

    def method_arg(self) -> str | list[str]:
        """The `method` argument of `tokprune.apply`: one name, or the list to compose."""
        return self.method[0] if len(self.method) == 1 else list(self.method)


def option_value(value: Any) -> Any:
    """A method option from its model_args text: Python literals are evaluated, lists become tuples,
    "none" becomes None, anything else stays a string. Non-strings pass through unchanged."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(parsed) if isinstance(parsed, list) else parsed


def parse_methods(method: Any) -> list[str]:
    """`method` as a list of names: "visionzip+fastv" composes; None/"none" means unpruned."""
    if method is None:
        return []
    if isinstance(method, (list, tuple)):
        return [str(m) for m in method]
    if not isinstance(method, str):
        raise ModelArgsError(f"method must be a method name such as 'divprune', got {method!r}")
    names = [m.strip() for m in method.split("+")]
    if len(names) == 1 and names[0].lower() in NO_METHOD:
        return []
    if any(not n for n in names):
        raise ModelArgsError(f"method {method!r} has an empty name; write e.g. method=visionzip+fastv")
    return names


def positive_int(name: str, value: Any) -> int:
    """An integer model argument that must be >= 1 (accepts "4" and 4.0)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1 or not number.is_integer():
        raise ModelArgsError(f"{name} must be a positive integer, got {value!r}")
    return int(number)


def batch_size_value(value: Any) -> int:
    """lmms-eval passes the CLI's --batch_size as a string; 'auto' is not supported and means 1."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return 1
    return positive_int("batch_size", value)


def budget_value(value: Any) -> Any:
    """`budget` as an int where it is integral ("64", 64.0); anything else is left to tokprune to reject."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        parsed = option_value(value)
        return int(parsed) if isinstance(parsed, float) and parsed.is_integer() else parsed
    return value


def run_args(
    *,
    pretrained: Any = None,
    method: Any = None,
    budget: Any = None,
    keep_ratio: Any = None,
    attn_implementation: Any = None,
    dtype: str = "auto",
    device: str | None = None,
    batch_size: Any = 1,
    max_new_tokens: Any = None,
    **options: Any,
) -> RunArgs:
    """Validate the plugin's keyword arguments; unknown keys become method options."""
    if str(dtype) not in DTYPES:
        raise ModelArgsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    names = parse_methods(method)
    if not names and (budget is not None or keep_ratio is not None or options):
        given = ", ".join(
            [k for k, v in (("budget", budget), ("keep_ratio", keep_ratio)) if v is not None] + list(options)
        )
        raise ModelArgsError(
            f"{given} given without a method; add method=<name> (one of tokprune.available_methods())"
        )
    return RunArgs(
        pretrained=None if pretrained is None else str(pretrained),
        method=names,
        budget=None if budget is None else budget_value(budget),
        keep_ratio=None if keep_ratio is None else option_value(keep_ratio),
        options={key: option_value(value) for key, value in options.items()},
        attn_implementation=None if attn_implementation is None else str(attn_implementation),
        dtype=str(dtype),
        device=None if device is None else str(device),
        batch_size=batch_size_value(batch_size),
        max_new_tokens=None if max_new_tokens is None else positive_int("max_new_tokens", max_new_tokens),
    )
