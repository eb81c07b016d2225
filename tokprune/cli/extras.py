"""Optional dependencies: which commands need which extra, and the one-line refusal that names it.

The base install (torch, transformers, accelerate, einops) lists the methods and models; `demo` needs the
`demo` extra (Pillow for the toy's images and processors, matplotlib for its plot and picture), `bench` and
`robustness` need Pillow (the presets' and checkpoints' processors take PIL images) from the `bench` extra.
"""

from __future__ import annotations

import importlib.util

from tokprune.cli.arguments import CliError

PACKAGES = {"PIL": "Pillow", "matplotlib": "matplotlib"}  # import name -> the package pip installs
# command -> (the extra that brings what it needs, the modules it cannot run without)
NEEDS = {
    "demo": ("demo", ("PIL", "matplotlib")),
    "bench": ("bench", ("PIL",)),
    "robustness": ("bench", ("PIL",)),
}


def is_missing(module: str) -> bool:
    """True when `module` cannot be imported here: not installed, or blocked with None in sys.modules
    (for which find_spec answers None too); looked up without importing it."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or a loaded module without a spec
        return True


def install_hint(extra: str) -> str:
    """How to install `extra`, as a user (from the registry) and in a clone (with the pinned constraints,
    as the Makefile installs)."""
    return f"pip install 'tokprune[{extra}]' (in a clone: pip install -c constraints.txt -e '.[{extra}]')"


def require_extra(command: str) -> None:
    """A CliError naming the extra to install when `command` needs modules that are not installed here;
    nothing for commands that run on the base install."""
    if command not in NEEDS:
        return
    extra, modules = NEEDS[command]
    missing = [PACKAGES[m] for m in modules if is_missing(m)]
    if missing:
        raise CliError(
            f"tokprune {command} needs the '{extra}' extra ({' and '.join(missing)} not installed here): "
            + install_hint(extra)
        )
