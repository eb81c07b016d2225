"""Run transformers' own flash_attention_2 code path on the CPU, with tokprune's reference kernel.

transformers imports flash-attn lazily (`modeling_flash_attention_utils._lazy_imports`); on a machine
without it (no GPU here) `reference_flash_attention()` hands transformers the PyTorch implementation of
flash-attn's API in `tokprune.kernels.varlen` instead, so that everything transformers does around the
kernel (its 2-D padding masks, unpadding, cu_seqlens, re-padding, decode alignment) runs for real. Every
call is logged with the number of query tokens it computed, to show that no padding reaches the kernel.
Where flash-attn itself is installed (a GPU machine) its own kernels run, logged the same way.

The stand-in refuses what flash-attn refuses, fp32 inputs included (`varlen.check_flash_inputs`); fp32
models are compared on the CPU with the explicit `allow_fp32=True`, bf16 models without it.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import transformers.modeling_flash_attention_utils as hf_flash
from transformers.utils import is_flash_attn_2_available

from tokprune.kernels import varlen


def _logged(fn, calls: list, kind: str, **extra):
    @functools.wraps(fn)  # transformers reads the kernel's signature to pick the keywords it passes
    def run(q, *args, **kwargs):
        calls.append((kind, int(q.shape[0]) if kind == "varlen" else int(q.shape[0] * q.shape[1])))
        return fn(q, *args, **extra, **kwargs)

    return run


def real_flash_attention() -> bool:
    """Whether flash-attn itself is installed (a CUDA machine): then its kernels run, on CUDA tensors in
    fp16 / bf16 only."""
    return is_flash_attn_2_available()


def _stand_in(calls: list, allow_fp32: bool) -> tuple:
    return (
        _logged(varlen.flash_attn_func, calls, "dense", allow_fp32=allow_fp32),
        _logged(varlen.flash_attn_varlen_func, calls, "varlen", allow_fp32=allow_fp32),
        None,  # no paged-cache kernel: transformers only needs it for continuous batching
        varlen.pad,
        varlen.unpad,
    )


@contextmanager
def reference_flash_attention(allow_fp32: bool = False):
    """Yields the list of kernel calls, ("varlen" | "dense", query tokens computed): of the stand-in, or
    of flash-attn's own kernels where it is installed (logged the same way).

    The stand-in refuses fp32 inputs as flash-attn does; allow_fp32=True is the explicit opt-in for exact
    comparisons of fp32 models on the CPU, refused where the real kernel runs (it would refuse fp32)."""
    calls: list[tuple[str, int]] = []
    saved = hf_flash._lazy_imports
    if real_flash_attention():
        if allow_fp32:
            raise ValueError("allow_fp32 is for the CPU stand-in; flash-attn runs fp16 / bf16 only")

        def kernels(*args, **kwargs):
            flash, flash_varlen, *rest = saved(*args, **kwargs)
            return (_logged(flash, calls, "dense"), _logged(flash_varlen, calls, "varlen"), *rest)

    else:
        stand_in = _stand_in(calls, allow_fp32)

        def kernels(*args, **kwargs):
            return stand_in

    hf_flash._lazy_imports = kernels
    hf_flash._loaded_implementation = None  # forget a previously loaded kernel set
    try:
        yield calls
    finally:
        hf_flash._lazy_imports = saved
        hf_flash._loaded_implementation = None


def supports_flash_attention_2(model) -> bool:
    """Whether transformers lets `model` (and its language model) run flash_attention_2. Gemma 3 does not
    in transformers 5.24 (`_supports_flash_attn = False`: flash would drop its bidirectional image blocks,
    and `set_attn_implementation` refuses it)."""
    language_model = getattr(model.model, "language_model", None) or model.model.text_model
    return bool(type(model)._supports_flash_attn and type(language_model)._supports_flash_attn)


def use_flash_attention_2(model) -> None:
    """Switch the language model of `model` to flash_attention_2 (the vision tower keeps its backend),
    refusing a model transformers does not support it for. The config is set directly, because
    `set_attn_implementation` also requires flash-attn to be installed, which the CPU stand-in replaces."""
    if not supports_flash_attention_2(model):
        raise ValueError(f"transformers does not run {type(model).__name__} under flash_attention_2")
    model.config.get_text_config()._attn_implementation = "flash_attention_2"
