"""4-D attention masks for decoder layers whose KV cache has been shortened by pruning."""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from tokprune.core.compat import CACHE_KWARG


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
