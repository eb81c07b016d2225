"""Quantities that methods score tokens with, computed inside hooks from a layer's own projections.

Nothing here switches the model to eager attention, asks for `output_attentions`, or builds an N x N
attention map: the rows that are needed are recomputed, and column sums are streamed over query blocks.
"""

from tokprune.signals.attention import cls_attention, last_query_attention, received_attention
from tokprune.signals.llm import last_query_scores, rotated_keys

__all__ = [
    "cls_attention",
    "last_query_attention",
    "last_query_scores",
    "received_attention",
    "rotated_keys",
]
