"""Fused kernels for the attention-derived signals, and the bookkeeping of variable-length attention.

* `tokprune.kernels.scores` — Triton kernels (imported lazily: Triton is optional) for
  - attention rows of a few queries (a ViT's [CLS] row, the last query, the instruction's queries),
    head-averaged, GQA-aware, with a per-query causal limit and a key padding mask;
  - attention *received* per token (column means of softmax(Q Kᵀ)) over block-diagonal segments
    (images, frames or windows given by their sizes, as the Qwen ViT's cu_seqlens).
  Both stream over key/query tiles with the row log-sum-exp (two passes); nothing of size N x N is
  ever stored. On CUDA tensors `tokprune.signals` uses them when Triton is installed; elsewhere the
  chunked PyTorch functions of `tokprune.signals.attention` run (they are also the reference the
  kernels are tested against, on CPU with TRITON_INTERPRET=1).
* `tokprune.kernels.varlen` — unpad / pad / cumulative lengths of ragged batches and a reference
  variable-length attention with flash-attn's API (the CPU stand-in used to test transformers'
  flash_attention_2 path on pruned, ragged batches; it refuses what flash-attn refuses, fp32 inputs
  included, unless `allow_fp32=True` is passed for an exact CPU comparison).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

BACKENDS = ("auto", "torch", "triton")


class _Default(threading.local):
    """What backend="auto" resolves to, per thread (changed by default_backend())."""

    name = "auto"


_default = _Default()


@contextmanager
def default_backend(name: str) -> Iterator[None]:
    """Within the block, signals called with backend="auto" (all of tokprune's own calls) use `name`:
    "torch" forces the chunked PyTorch path, "triton" the kernels, "auto" the default choice. The setting
    is the calling thread's: other threads keep theirs."""
    _check(name)
    saved = _default.name
    _default.name = name
    try:
        yield
    finally:
        _default.name = saved


def _check(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def triton_available() -> bool:
    """True when Triton can be imported (it is an optional dependency)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(backend: str, *tensors) -> bool:
    """Whether a signal should run its Triton kernel: backend "triton" (forced), "torch" (never) or
    "auto" (the `default_backend` if one is set, else: CUDA tensors and Triton installed)."""
    _check(backend)
    if backend == "auto":
        backend = _default.name
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs Triton: pip install triton")
        if not interpreting() and not all(t.is_cuda for t in tensors):
            raise ValueError(
                "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 to run them on the CPU)"
            )
        return True
    return all(t.is_cuda for t in tensors) and triton_available()
