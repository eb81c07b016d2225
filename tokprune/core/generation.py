"""generate() modes whose prefill is not one forward over exactly the prompt.

Chunked prefill (`prefill_chunk_size=`) splits the prompt, images included, across several forwards, while
tokprune prunes an image inside the one forward that holds all of it: refused for prompts with images.

Assisted generation (`assistant_model=`, `prompt_lookup_num_tokens=`, `assistant_early_exit=`) runs its first
verification forward on the prompt *and* the draft tokens at once. A method that scores with the prompt's
text (FastV's last query, SparseVLM's instruction raters, CDPruner's instruction relevance) would then score
with the draft instead, and keep other tokens than plain generate() does: silently different results. Methods
that read no text (visual signals only) are unaffected by tokens after the prompt and are allowed.
"""

from __future__ import annotations

import functools

from torch import nn

from tokprune.core.layout import brings_images
from tokprune.core.wrap import InstanceWrap
from tokprune.errors import UnsupportedInputError

# signals computed from the prompt's text tokens (their values would change with tokens after the prompt)
TEXT_SIGNALS = frozenset({"instruction", "last_query_attention", "text_query_attention"})
# generate() arguments (or GenerationConfig fields) that turn on assisted generation
ASSISTED = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def reads_text(signals) -> bool:
    """Whether any of `signals` ("name" or "name@layer") is computed from the prompt's text."""
    return any(name.split("@")[0] in TEXT_SIGNALS for name in signals)


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


def guard_generate(model: nn.Module, text_readers: list[str]) -> InstanceWrap:
    """Wrap `model.generate` (on the instance) to refuse, before anything runs, chunked prefill of a prompt
    with images and (where any of `text_readers`, the names of methods reading text, is installed)
    assisted generation."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if is_chunked(model, kwargs) and brings_images(kwargs):
            raise UnsupportedInputError(
                "chunked prefill (prefill_chunk_size) splits the images across forwards, and tokprune prunes an "
                "image within the forward that holds all of it: pass prefill_chunk_size=None"
            )
        if text_readers and is_assisted(model, kwargs):
            raise UnsupportedInputError(
                f"assisted generation runs the prompt and the draft tokens in one prefill, so "
                f"{' + '.join(text_readers)} would score with the draft instead of the prompt's text: use "
                "generate() without an assistant, or a method that reads no text (e.g. divprune, visionzip, dart)"
            )
        return original(*args, **kwargs)

    return InstanceWrap(model, "generate", generate)
