"""Run transformers' own flash_attention_2 code path on the CPU, with tokprune's reference kernel.

transformers imports flash-attn lazily (`modeling_flash_attention_utils._lazy_imports`); on a machine
without it (no GPU here) `reference_flash_attention()` hands transformers the PyTorch implementation of
flash-attn's API in `tokprune.kernels.varlen` instead, so that everything transformers does around the
kernel (its 2-D padding masks, unpadding, cu_seqlens, re-padding, decode alignment) runs for real. Every
call is logged with the number of query tokens it computed, to show that no padding reaches the kernel.
Where flash-attn itself is installed (a GPU machine) nothing is replaced.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import transformers.modeling_flash_attention_utils as hf_flash
from transformers.utils import is_flash_attn_2_available

from tokprune.kernels import varlen


def _logged(fn, calls: list, kind: str):
    @functools.wraps(fn)  # transformers reads the kernel's signature to pick the keywords it passes
    def run(q, *args, **kwargs):
        calls.append((kind, int(q.shape[0]) if kind == "varlen" else int(q.shape[0] * q.shape[1])))
        return fn(q, *args, **kwargs)

    return run


@contextmanager
def reference_flash_attention():
    """Yields the list of kernel calls, (\"varlen\" | \"dense\", query tokens computed)."""
    calls: list[tuple[str, int]] = []
    if is_flash_attn_2_available():
        yield calls
        return
    kernels = (
        _logged(varlen.flash_attn_func, calls, "dense"),
        _logged(varlen.flash_attn_varlen_func, calls, "varlen"),
        None,  # no paged-cache kernel: transformers only needs it for continuous batching
        varlen.pad,
        varlen.unpad,
    )
    saved = hf_flash._lazy_imports
    hf_flash._lazy_imports = lambda *args, **kwargs: kernels
    hf_flash._loaded_implementation = None  # forget a previously loaded kernel set
    try:
        yield calls
    finally:
        hf_flash._lazy_imports = saved
        hf_flash._loaded_implementation = None


def use_flash_attention_2(model) -> None:
    """Switch the language model of `model` to flash_attention_2 (the vision tower keeps its backend)."""
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
