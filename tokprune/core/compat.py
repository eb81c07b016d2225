"""Names that differ between the transformers releases tokprune supports (5.20 and later).

transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache` (the old name still works
in `forward` calls, with a deprecation warning, but forward *hooks* see whichever name the caller used:
generate() and the 5.24 modelling code pass `cache=`, older code and user loops `past_key_values=`).
"""

from __future__ import annotations

import inspect

from transformers.masking_utils import create_causal_mask

# the keyword create_causal_mask (and every 5.24 forward) takes the cache under
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_in(kwargs: dict):
    """The KV cache a hooked forward received (under either name), or None."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def output_cache(output):
    """The KV cache of a model or generate() output, read under whichever field name it has (`cache` in
    5.24, where reading `past_key_values` warns; `past_key_values` before), or None."""
    fields = dict(output.items())
    return fields.get("cache", fields.get("past_key_values"))
