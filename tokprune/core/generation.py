"""generate() modes whose prefill is not one forward over exactly the prompt.

Chunked prefill (`prefill_chunk_size=`) splits the prompt, images included, across several forwards, while
tokprune prunes an image inside the one forward that holds all of it: refused for prompts with images.

Some forwards of generate() hold tokens after the prompt from the start: assisted generation
(`assistant_model=`, ...) verifies its first drafts in the prefill, and `use_cache=False` re-runs the prompt
with the tokens generated so far at every step. The wrapper tells the engine where the prompt ends, so that
text signals (FastV's last query, SparseVLM's instruction raters, CDPruner's instruction relevance) read the
prompt alone and every method keeps the tokens plain, cached generate() keeps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager

from torch import nn

from tokprune.core.layout import brings_images
from tokprune.core.wrap import InstanceWrap
from tokprune.errors import UnsupportedInputError


def _generation_config(model: nn.Module, kwargs: dict):
    """The GenerationConfig generate(**kwargs) starts from."""
    return kwargs.get("generation_config") or getattr(model, "generation_config", None)


def is_chunked(model: nn.Module, kwargs: dict) -> bool:
    """Whether generate(**kwargs) on `model` splits the prefill into chunks."""
    config = _generation_config(model, kwargs)
    return (kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None)) is not None


def guard_generate(
    model: nn.Module, set_prompt_length: Callable[[int | None], None], lock: AbstractContextManager
) -> InstanceWrap:
    """Wrap `model.generate` (on the instance): refuse chunked prefill of a prompt with images before
    anything runs; hold `lock` (one call at a time through the patched model) for the whole call; while it
    runs, report the prompt's length (input_ids columns) through `set_prompt_length`, and None once it
    returns."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if is_chunked(model, kwargs) and brings_images(kwargs):
            raise UnsupportedInputError(
                "chunked prefill (prefill_chunk_size) splits the images across forwards, and tokprune prunes an "
                "image within the forward that holds all of it: pass prefill_chunk_size=None"
            )
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        with lock:
            set_prompt_length(input_ids.shape[-1] if input_ids is not None else None)
            try:
                return original(*args, **kwargs)
            finally:
                set_prompt_length(None)

    return InstanceWrap(model, "generate", generate)
