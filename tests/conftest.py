import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# under pytest-xdist (`-n 2`, what `make test` runs) each worker takes one of the machine's cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
# without a GPU, Triton kernels run in Triton's CPU interpreter; this must be set before anything imports
# Triton (the transformers model classes do)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import BUILDERS  # noqa: E402

_CACHE: dict = {}


@pytest.fixture
def tiny():
    """tiny(family, attn) -> (model, processor), built once per (family, attn) per session."""

    def get(family: str, attn: str = "sdpa"):
        key = (family, attn)
        if key not in _CACHE:
            _CACHE[key] = BUILDERS[family](attn)
        return _CACHE[key]

    return get


# the vLLM plugin's tests need the environment `make vllm-env` builds (`make test-vllm` runs them)
collect_ignore = ["vllm"]
