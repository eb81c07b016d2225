"""Command-line values: dtypes and attention backends, budgets, options, --out; the user error."""

from __future__ import annotations

import os
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
# transformers' attention backends tokprune is tested with (flex_attention: on families whose
# transformers classes support it; its kernels are compiled, which needs a GPU or a working inductor)
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flex_attention")


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_budget(text: str) -> dict:
    """'64' -> budget=64; '0.25' -> keep_ratio=0.25; '33.3%' -> keep_ratio=0.333."""
    try:
        if text.endswith("%"):
            return {"keep_ratio": float(text[:-1]) / 100}
        if "." in text:
            return {"keep_ratio": float(text)}
        return {"budget": int(text)}
    except ValueError:
        raise CliError(
            f"budget {text!r} is not a token count (64), a keep ratio (0.25) or a percentage (33.3%)"
        ) from None


def parse_option(text: str) -> tuple[str, object]:
    """'layer=3' -> ('layer', 3); values are Python literals where they parse, else strings."""
    import ast

    if "=" not in text:
        raise CliError(f"option {text!r} must look like name=value (e.g. layer=3)")
    name, value = text.split("=", 1)
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def split_list(values: list[str]) -> list[str]:
    return [item for value in values for item in value.split(",") if item]


def check_device(device: str) -> None:
    """A `--device` this torch build can run on (cpu; cuda / cuda:N with a CUDA build and that many GPUs;
    mps where available), else a CliError that says what to use instead."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise CliError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CliError(
                f"--device {device}: this torch ({torch.__version__}) has no usable CUDA device; "
                "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        if parsed.index is not None and parsed.index >= count:
            raise CliError(
                f"--device {device}: only {count} CUDA device(s) here (cuda:0 .. cuda:{count - 1})"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise CliError(f"--device {device}: tokprune commands run on cpu, cuda or mps")


def check_out_dir(out: str) -> Path:
    """`--out` as a Path, refused before any work when it cannot become a writable folder: an existing
    file, a path through a file, or a folder (or its nearest existing parent) this user cannot write."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CliError(f"--out {out} is a file; give a folder (new or existing) for the results")
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise CliError(f"--out {out}: {existing} is a file, so the folder cannot be made; give another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: {existing} is not writable by this user; give another --out")
    return path
