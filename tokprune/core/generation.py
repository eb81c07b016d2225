"""generate() modes whose prefill is not one forward over exactly the prompt.

Chunked prefill (`prefill_chunk_size=`) splits the prompt, images included, across several forwards, while
tokprune prunes an image inside the one forward that holds all of it: refused for prompts with images.

Assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`, `assistant_early_exit=`) runs its first
verification forward on the prompt *and* the draft tokens at once. The wrapper tells the engine where the
prompt ends, so that text signals (FastV's last query, SparseVLM's instruction raters, CDPruner's instruction
relevance) read the prompt alone and every method keeps the tokens plain generate() keeps.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

from tokprune.core.layout import brings_images
from tokprune.core.wrap import InstanceWrap
from tokprune.errors import UnsupportedInputError

# generate() arguments (or GenerationConfig fields) that turn on assisted generation
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def _generation_config(model: nn.Module, kwargs: dict):
    """The GenerationConfig generate(**kwargs) starts from."""
    return kwargs.get("generation_config") or getattr(model, "generation_config", None)


def is_assisted(model: nn.Module, kwargs: dict) -> bool:
    """Whether generate(**kwargs) on `model` runs assisted generation."""
    config = _generation_config(model, kwargs)
    return any(kwargs.get(k) is not None or getattr(config, k, None) is not None for k in ASSISTED)


def is_chunked(model: nn.Module, kwargs: dict) -> bool:
    """Whether generate(**kwargs) on `model` splits the prefill into chunks."""
    config = _generation_config(model, kwargs)
    return (kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None)) is not None


def guard_generate(model: nn.Module, set_prompt_length: Callable[[int | None], None]) -> InstanceWrap:
    """Wrap `model.generate` (on the instance): refuse chunked prefill of a prompt with images before
    anything runs; around an assisted generate(), report the prompt's length (input_ids columns) through
    `set_prompt_length`, and None once it returns."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if is_chunked(model, kwargs) and brings_images(kwargs):
            raise UnsupportedInputError(
                "chunked prefill (prefill_chunk_size) splits the images across forwards, and tokprune prunes an "
                "image within the forward that holds all of it: pass prefill_chunk_size=None"
            )
        if not is_assisted(model, kwargs):
            return original(*args, **kwargs)
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        set_prompt_length(input_ids.shape[-1] if input_ids is not None else None)
        try:
            return original(*args, **kwargs)
        finally:
            set_prompt_length(None)

    return InstanceWrap(model, "generate", generate)
