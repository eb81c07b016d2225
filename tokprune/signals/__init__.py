"""Quantities that methods score tokens with, computed inside hooks from a layer's own projections.

Nothing here switches the model to eager attention, asks for `output_attentions`, or builds an N x N
attention map: the rows that are needed are recomputed, column sums are streamed over query blocks, and
means of pre-softmax logits are taken on the projections (they are linear in q and k).
"""

from tokprune.signals.attention import (
    CLS_SIGNALS,
    LOGIT_SIGNALS,
    cls_attention,
    cls_attention_concat,
    cls_logits,
    last_query_attention,
    logit_column_mean,
    logit_row_mean,
    logit_signal,
    received_attention,
    vit_signal,
)
from tokprune.signals.llm import last_query_scores, rotated_keys

__all__ = [
    "CLS_SIGNALS",
    "LOGIT_SIGNALS",
    "cls_attention",
    "cls_attention_concat",
    "cls_logits",
    "last_query_attention",
    "last_query_scores",
    "logit_column_mean",
    "logit_row_mean",
    "logit_signal",
    "received_attention",
    "rotated_keys",
    "vit_signal",
]
