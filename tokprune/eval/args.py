"""The plugin's model arguments: what `--model_args key=value,...` means for `--model tokprune`.

Three kinds of key, told apart by name alone:

* loading keys, the ones lmms-eval's own HF models take (`LOAD_KEYS`): pretrained, revision, device,
  device_map, dtype (or its alias torch_dtype), attn_implementation, trust_remote_code, and the processor's
  min_pixels / max_pixels (pixel-budget processors such as Qwen-VL's);
* run and pruning keys (`RUN_KEYS`, `PRUNE_KEYS`): batch_size, max_batch_size (passed by the CLI,
  ignored), max_new_tokens; method, budget, keep_ratio, video_budget, order, positions;
* every other key is an option of the method: `layer=3` (one method), or `<method>.<option>=value`
  (`method=visionzip+fastv,fastv.layer=3`: one stage of a composition; `visionzip.budget=192` sets that
  stage's own count). No method option has the name of a reserved key (tests/test_lmms_args.py checks).

Everything is checked here, before any checkpoint is loaded: an unknown key, a method option the method
does not have, a bad budget or value is a `ModelArgsError` (or tokprune's own error) naming the key and
what to write instead. lmms-eval has already turned "true"/"false", integers and floats into Python
values; `option_value` finishes the job for strings ("[8,16,24]" -> (8, 16, 24), "none" -> None).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import torch

from tokprune.api import ORDERS, POSITIONS
from tokprune.core.budget import Budget, check_video_budget
from tokprune.errors import MethodOptionError

NO_METHOD = ("", "none", "unpruned", "baseline")
DTYPES = ("auto", "float32", "float16", "bfloat16")
DTYPE_ALIASES = {
    "float": "float32",
    "fp32": "float32",
    "half": "float16",
    "fp16": "float16",
    "bf16": "bfloat16",
}

LOAD_KEYS = {
    "pretrained": "HF id, local folder or 'toy'",
    "revision": "branch, tag or commit of the checkpoint",
    "device": "torch device the model runs on (cuda, cuda:1, cpu; default: cuda if available)",
    "device_map": "passed to from_pretrained ('auto' spreads the model over the GPUs)",
    "dtype": f"one of {', '.join(DTYPES)} (also torch_dtype)",
    "torch_dtype": "alias of dtype",
    "attn_implementation": "sdpa (default), eager, flash_attention_2, ...",
    "trust_remote_code": "true to run the checkpoint's own code",
    "min_pixels": "processor: fewest pixels an image is resized to (Qwen-VL style processors)",
    "max_pixels": "processor: most pixels an image is resized to (Qwen-VL style processors)",
}
RUN_KEYS = {
    "batch_size": "requests per generate() call",
    "max_batch_size": "passed by the lmms-eval CLI; ignored",
    "max_new_tokens": "overrides the task's generation_kwargs",
}
PRUNE_KEYS = {
    "method": "registered method name, 'a+b' composes; omitted/none = unpruned",
    "budget": "visual tokens kept per image (the last method's)",
    "keep_ratio": "fraction of visual tokens kept (the last method's)",
    "video_budget": "'frame' or 'clip': how budget counts a video",
    "order": "'original' or 'selection' (reproduction mode)",
    "positions": "'original' or 'contiguous' (reproduction mode)",
}
RESERVED = {**LOAD_KEYS, **RUN_KEYS, **PRUNE_KEYS}


class ModelArgsError(MethodOptionError):
    """A model argument of the lmms-eval plugin is missing, malformed or conflicting."""


@dataclass
class LoadArgs:
    """How the model and processor are loaded (or, for a built model, adjusted in place).

    dtype "auto": the checkpoint's (a built model keeps its own); attn_implementation None: sdpa for a
    checkpoint, a built model keeps its own. device None: cuda if available, else cpu, unless device_map
    places the model. processor_kwargs: min_pixels / max_pixels for `AutoProcessor.from_pretrained`.
    """

    pretrained: str | None = None
    revision: str | None = None
    device: str | None = None
    device_map: str | None = None
    dtype: str = "auto"
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    processor_kwargs: dict[str, int] = field(default_factory=dict)

    def checkpoint_only(self) -> list[str]:
        """The keys given that only make sense when loading a checkpoint from files."""
        given = {
            "revision": self.revision is not None,
            "device_map": self.device_map is not None,
            "trust_remote_code": self.trust_remote_code,
            **{key: True for key in self.processor_kwargs},
        }
        return [key for key, value in given.items() if value]


@dataclass
class PruneArgs:
    """What `tokprune.apply` gets. method: names (several = composition, empty = unpruned); options: the
    single method's options; stage_options: {method name: its options} from `<method>.<option>` keys."""

    method: list[str] = field(default_factory=list)
    budget: int | None = None
    keep_ratio: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    stage_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    video_budget: str = "frame"
    order: str = "original"
    positions: str = "original"

    @property
    def pruned(self) -> bool:
        return bool(self.method)

    def method_arg(self) -> str | list:
        """`tokprune.apply`'s method argument: one name, names to compose, or (name, options) pairs."""
        if self.stage_options:
            return [(name, self.stage_options.get(name, {})) for name in self.method]
        return self.method[0] if len(self.method) == 1 else list(self.method)

    def apply_kwargs(self) -> dict[str, Any]:
        """`tokprune.apply`'s keyword arguments (budget, reproduction mode, the single method's options)."""
        return dict(
            budget=self.budget, keep_ratio=self.keep_ratio, video_budget=self.video_budget,
            order=self.order, positions=self.positions, **self.options,
        )  # fmt: skip


@dataclass
class RunArgs:
    """All model arguments: loading, pruning, and how requests run (max_new_tokens None: the task's)."""

    load: LoadArgs = field(default_factory=LoadArgs)
    prune: PruneArgs = field(default_factory=PruneArgs)
    batch_size: int = 1
    max_new_tokens: int | None = None


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


def bool_value(name: str, value: Any) -> bool:
    """A true/false model argument (lmms-eval has already parsed "true"/"false")."""
    if isinstance(value, bool):
        return value
    raise ModelArgsError(f"{name} must be true or false, got {value!r}")


def choice_value(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ModelArgsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def dtype_value(dtype: Any, torch_dtype: Any) -> str:
    """The dtype name from `dtype` or its alias `torch_dtype` (lmms-eval's HF models take either)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ModelArgsError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them")
    name = str(dtype if dtype is not None else torch_dtype if torch_dtype is not None else "auto")
    name = DTYPE_ALIASES.get(name.removeprefix("torch."), name.removeprefix("torch."))
    return choice_value("dtype", name, DTYPES)


def device_value(name: str, value: Any) -> str | None:
    """A device string that torch understands, "auto" (choose: cuda if available), or None ("" too)."""
    if value is None or str(value) == "":
        return None
    text = str(value)
    if text == "auto":
        return text
    try:
        torch.device(text)
    except (RuntimeError, TypeError):
        raise ModelArgsError(
            f"{name} must be a torch device such as cuda, cuda:1 or cpu, got {value!r}"
        ) from None
    return text


def device_map_value(value: Any) -> str | None:
    """`device_map` for from_pretrained: "auto" / "balanced" / ... or one device; "" means none."""
    if value is None or str(value) == "":
        return None
    if str(value) in ("auto", "balanced", "balanced_low_0", "sequential"):
        return str(value)
    return device_value("device_map", value)


def load_args(args: dict[str, Any]) -> LoadArgs:
    """The loading keys of `args` (already split from the rest)."""
    device, device_map = device_value("device", args.get("device")), device_map_value(args.get("device_map"))
    if device is not None and device_map is not None and device != device_map:
        raise ModelArgsError(
            f"device={device} and device_map={device_map} disagree; give device (the model is moved there) "
            "or device_map (passed to from_pretrained; 'auto' spreads the model over the GPUs), not both"
        )
    pretrained, revision = args.get("pretrained"), args.get("revision")
    return LoadArgs(
        pretrained=None if pretrained is None else str(pretrained),
        revision=None if revision is None else str(revision),
        device=device,
        device_map=device_map,
        dtype=dtype_value(args.get("dtype"), args.get("torch_dtype")),
        attn_implementation=None
        if args.get("attn_implementation") is None
        else str(args["attn_implementation"]),
        trust_remote_code=bool_value("trust_remote_code", args.get("trust_remote_code", False)),
        processor_kwargs={
            key: positive_int(key, args[key])
            for key in ("min_pixels", "max_pixels")
            if args.get(key) is not None
        },
    )


def split_options(
    names: list[str], unknown: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the single method's options, {method: options} from `<method>.<option>` keys) of the keys that
    are not reserved; a scope naming no method of `names` is an error."""
    options: dict[str, Any] = {}
    staged: dict[str, dict[str, Any]] = {}
    for key, value in unknown.items():
        scope, dot, option = key.partition(".")
        if not dot:
            options[key] = option_value(value)
            continue
        if scope not in names or not option:
            raise ModelArgsError(
                f"{key}: a scoped option is <method>.<option> for a method of method={'+'.join(names) or 'none'}"
            )
        staged.setdefault(scope, {})[option] = option_value(value)
    return options, staged


def method_options(name: str) -> set[str] | None:
    """The option names of a registered method; None for an unknown name (make_method reports it)."""
    import dataclasses

    from tokprune.methods import REGISTRY

    cls = REGISTRY.get(name)
    return {f.name for f in dataclasses.fields(cls)} if cls is not None else None


def reject_unknown(names: list[str], options: dict[str, Any]) -> None:
    """A key that is neither reserved nor an option of the (single) method: say both."""
    reserved = ", ".join(RESERVED)
    if not names:
        raise ModelArgsError(
            f"{', '.join(options)}: not a model argument of tokprune ({reserved}); method options need "
            "method=<name> (one of tokprune.available_methods())"
        )
    if len(names) > 1:
        raise ModelArgsError(
            f"{', '.join(options)}: not a model argument of tokprune ({reserved}); with several methods "
            f"write each option as <method>.<option>, e.g. {names[-1]}.{next(iter(options))}=..."
        )
    known = method_options(names[0])
    unknown = sorted(set(options) - (known or set()))
    if known is not None and unknown:
        raise ModelArgsError(
            f"{', '.join(unknown)}: neither a model argument of tokprune ({reserved}) nor an option of "
            f"{names[0]} ({', '.join(sorted(known)) or 'it has none'})"
        )


def check_pruning(prune: PruneArgs) -> None:
    """Method names, options and budgets as tokprune.apply will check them, before any model exists."""
    from tokprune.methods import make_method, make_stage

    if not prune.method:
        return
    for name in prune.method:
        if name in prune.stage_options:
            make_stage(name, prune.stage_options[name])
        elif not prune.options:
            make_method(name, {})
    if prune.options:
        make_method(prune.method[0], prune.options)
    last = prune.stage_options.get(prune.method[-1], {})
    if (prune.budget is not None or prune.keep_ratio is not None) and set(last) & {"budget", "keep_ratio"}:
        raise ModelArgsError(
            f"{prune.method[-1]} got a budget twice ({prune.method[-1]}.budget/keep_ratio and budget/keep_ratio); "
            "give it once"
        )
    Budget.from_args(prune.budget, prune.keep_ratio, Budget(tokens=1))
    check_video_budget(prune.video_budget)


def prune_args(args: dict[str, Any], unknown: dict[str, Any]) -> PruneArgs:
    """The pruning keys of `args` and the method options in `unknown`, checked."""
    names = parse_methods(args.get("method"))
    options, staged = split_options(names, unknown)
    if options:
        reject_unknown(names, options)
    budget, keep_ratio = args.get("budget"), args.get("keep_ratio")
    if not names and (budget is not None or keep_ratio is not None):
        raise ModelArgsError(
            "budget/keep_ratio given without a method; add method=<name> (one of tokprune.available_methods())"
        )
    prune = PruneArgs(
        method=names,
        budget=None if budget is None else budget_value(budget),
        keep_ratio=None if keep_ratio is None else option_value(keep_ratio),
        options=options,
        stage_options=staged,
        video_budget=str(args.get("video_budget", "frame")),
        order=choice_value("order", args.get("order", "original"), ORDERS),
        positions=choice_value("positions", args.get("positions", "original"), POSITIONS),
    )
    check_pruning(prune)
    return prune


def run_args(**model_args: Any) -> RunArgs:
    """Split and validate the plugin's keyword arguments (see the module docstring)."""
    reserved = {key: value for key, value in model_args.items() if key in RESERVED}
    unknown = {key: value for key, value in model_args.items() if key not in RESERVED}
    max_new_tokens = reserved.get("max_new_tokens")
    return RunArgs(
        load=load_args(reserved),
        prune=prune_args(reserved, unknown),
        batch_size=batch_size_value(reserved.get("batch_size", 1)),
        max_new_tokens=None if max_new_tokens is None else positive_int("max_new_tokens", max_new_tokens),
    )
