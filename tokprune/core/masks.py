"""4-D attention masks for decoder layers whose KV cache has been shortened by pruning."""

from __future__ import annotations

import torch
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_causal_mask,
    create_sliding_window_causal_mask,
)

from tokprune.core.compat import CACHE_KWARG
from tokprune.errors import UnsupportedModelError


def joined(first: torch.Tensor | None, then: torch.Tensor) -> torch.Tensor:
    """Two 2-D masks side by side along the sequence, (B, P) then (B, L) -> (B, P + L) in first's dtype
    (e.g. the cache of the earlier turns, then the new tokens); `then` alone when first is None."""
    return then if first is None else torch.cat([first, then.to(first.dtype)], dim=1)


def check_mask_support(config) -> None:
    """Refuse a language model whose attention implementation has no mask function.

    Pruned batches are re-packed with left padding, so every decoder layer needs its padding mask; for an
    implementation registered with `AttentionInterface.register` but not `AttentionMaskInterface.register`,
    transformers builds no mask at all and padding would be silently attended.
    """
    name = config._attn_implementation
    registered = getattr(ALL_MASK_ATTENTION_FUNCTIONS, "_global_mapping", ALL_MASK_ATTENTION_FUNCTIONS)
    if name is not None and name not in registered:
        raise UnsupportedModelError(
            f"the language model runs attention {name!r}, which has no mask function, so transformers would "
            "ignore the padding of pruned batches: register one under the same name "
            f"(transformers.AttentionMaskInterface.register({name!r}, ...), e.g. "
            "transformers.masking_utils.sdpa_mask) or use sdpa, eager, flash_attention_2 or flex_attention"
        )


def layer_type(config, layer_idx: int) -> str:
    """'full_attention' or 'sliding_attention' for decoder layer `layer_idx`."""
    types = getattr(config, "layer_types", None)
    return types[layer_idx] if types else "full_attention"


def build_layer_mask(
    config,
    hidden_states: torch.Tensor,
    mask_2d: torch.Tensor,
    past_key_values,
    layer_idx: int,
    kind: str = "full_attention",
):
    """The mask a decoder layer at `layer_idx` receives, sized against that layer's own cache.

    hidden_states: (B, Q, D) the layer's input (gives batch, query length, dtype).
    mask_2d: (B, past + Q) padding mask over the cache of `layer_idx` plus the new tokens.
    """
    make = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return make(
        config=config,
        inputs_embeds=hidden_states,
        attention_mask=mask_2d,
        **{CACHE_KWARG: past_key_values},
        position_ids=None,
        layer_idx=layer_idx,
    )
