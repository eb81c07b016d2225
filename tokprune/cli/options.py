"""`--option` for one method or all, and the methods checked against a preset before it is built.

`--option layer=1` gives every method run the option (each must have it, as `tokprune.apply` requires);
`--option fastv.layer=1` gives it to fastv only and wins over a shared value for fastv.
"""

from __future__ import annotations

from tokprune.cli.arguments import CliError, parse_option


def method_options(methods: list[str], texts: list[str]) -> dict[str, dict]:
    """{method: its options} from `--option` texts: name=value for every method in `methods`,
    method.name=value for that one (which must be in `methods`)."""
    shared: dict[str, object] = {}
    targeted: dict[str, dict] = {method: {} for method in methods}
    for text in texts:
        name, value = parse_option(text)
        method, dot, option = name.rpartition(".")
        if not dot:
            shared[option] = value
        elif method in targeted:
            targeted[method][option] = value
        else:
            raise CliError(
                f"--option {text}: {method!r} is not one of the methods run ({', '.join(methods)}); "
                "write METHOD.NAME=VALUE for one of them, or NAME=VALUE for all"
            )
    return {method: {**shared, **targeted[method]} for method in methods}


def make_methods(options: dict[str, dict]) -> dict:
    """{name: Method} built with its options: unknown names and options fail here, before any model loads;
    an option given to all (`--option NAME=VALUE`) that one method lacks names the methods that have it."""
    from tokprune.errors import MethodOptionError
    from tokprune.methods import make_method

    methods = {}
    for name, given in options.items():
        try:
            methods[name] = make_method(name, given)
        except MethodOptionError as error:
            hint = _targeting_hint(name, options)
            if not hint:
                raise
            raise MethodOptionError(f"{error} ({hint})") from None
    return methods


def _targeting_hint(name: str, options: dict[str, dict]) -> str:
    """For an option `name` lacks that other methods run have: how to give it to them only ("" if none)."""
    from tokprune.methods import REGISTRY

    for option, value in options[name].items():
        if option in option_names(name):
            continue
        others = [m for m in options if m != name and m in REGISTRY and option in option_names(m)]
        if others:
            target = f"--option {others[0]}.{option}={value!r}"
            return f"--option {option}=... goes to every method run; for {others[0]} only: {target}"
    return ""


def option_names(method: str) -> set[str]:
    """The option names of the registered `method`."""
    import dataclasses

    from tokprune.methods import REGISTRY

    return {f.name for f in dataclasses.fields(REGISTRY[method])}


def check_on_preset(methods: dict, preset, layers: int | None) -> None:
    """Before building `preset` (with `--layers layers`): `--layers` in range, every in-LLM stage's layers
    in range for that depth (the methods' own checks, as `tokprune.apply` runs them on the built model) and
    AnyRes-only methods refused on a preset without tiles. Presets that state no depth or class pass."""
    try:
        depth = preset.depth(layers)
    except ValueError as error:
        raise CliError(str(error)) from None
    for name, method in methods.items():
        if depth is not None:
            _check_layers(name, method, depth, layers)
        if preset.model_class and method.needs_tiles and not _has_tiles(preset.model_class):
            raise CliError(
                f"{name} needs AnyRes images (a base view and high-resolution tiles), but {preset.name} "
                f"({preset.model_class}) has no tiles; use a preset with tiles, e.g. llava-next-7b"
            )


def _check_layers(name: str, method, depth: int, layers: int | None) -> None:
    """`method`'s in-LLM stages on a `depth`-layer LLM, through the same `llm_stages` the engine runs."""
    from tokprune.core.stages import llm_stages
    from tokprune.errors import MethodOptionError
    from tokprune.methods import LLMMethod
    from tokprune.methods.base import CompositeMethod

    parts = method.parts() if isinstance(method, CompositeMethod) else [method]
    stages = [(part, part.default_budget) for part in parts if isinstance(part, LLMMethod)]
    try:
        llm_stages(stages, depth)
    except MethodOptionError as error:
        truncated = f" (--layers {layers})" if layers is not None else ""
        option = next((o for o in ("layer", "layers") if o in option_names(name)), "NAME")
        raise CliError(
            f"{error}{truncated}; choose another with --option {name}.{option}=..., or keep more LLM layers "
            "(--layers)"
        ) from None


def _has_tiles(model_class: str) -> bool:
    """Whether tokprune's adapter for `model_class` sees AnyRes tiles (False for an unsupported class)."""
    from tokprune.patches import ADAPTERS

    return any(adapter.tiles for adapter in ADAPTERS if model_class in adapter.model_classes)
