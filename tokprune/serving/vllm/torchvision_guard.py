"""Make the registry's CUDA-built torchvision importable beside the CPU torch wheel (vLLM imports it).

torchvision's `_meta_registrations.py` registers fake kernels for `torchvision::nms` and `torchvision::qnms`
unconditionally; when its compiled ops do not load (a CUDA build beside a CPU torch) the import fails with
"operator torchvision::nms does not exist". Its other registrations are already guarded by
`torchvision.extension._has_ops()`; this guards those two the same way. Idempotent; run it in the
environment that holds vLLM, as a file (`python -m tokprune...` would import tokprune, hence transformers,
hence the unguarded torchvision, first):

    python tokprune/serving/vllm/torchvision_guard.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

OPS = ("nms", "qnms")
GUARD = "(lambda fn: fn)"


def guarded(source: str) -> str:
    """`source` (the file's text) with the two registrations guarded; unchanged if they already are."""
    for op in OPS:
        plain = f'@torch.library.register_fake("torchvision::{op}")\n'
        safe = f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else {GUARD})\n'
        source = source.replace(plain, safe)
    return source


def registrations_file() -> Path:
    """The installed torchvision's `_meta_registrations.py` (found without importing torchvision)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchvision is not installed in this environment; nothing to guard")
    return Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"


def main() -> int:
    path = registrations_file()
    source = path.read_text()
    patched = guarded(source)
    if patched == source:
        print(f"{path}: already guarded (or no unguarded registration)")
    else:
        path.write_text(patched)
        print(f"{path}: guarded torchvision::{'/'.join(OPS)} by torchvision.extension._has_ops()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
