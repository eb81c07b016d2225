"""Analytic FLOPs of a VLM prefill and decode step, per component and per LLM layer (DESIGN §6).

Convention
----------
FLOPs are counted the way ``torch.utils.flop_counter.FlopCounterMode`` counts them: one multiply-add is
**2 FLOPs**, and only matrix products are counted (linear layers, convolutions, attention's two
products). Elementwise work, norms, softmax, activations, RoPE, biases and the like are not counted.
Papers usually count multiply-adds (FastV's ``4nd² + 2n²d + 2ndm`` per layer), i.e. **half** of the
numbers here. Attention is counted over the full ``n_query × n_key`` score matrix, not halved for
causality, as FlopCounterMode counts sdpa (and as eager attention really multiplies).

Formulas
--------
n = tokens a layer processes, per batch row (padding not counted unless ``padded=True``); rows are summed.

LLM decoder layer (`llm_layer_flops`), hidden d, H query heads, H_kv key/value heads (GQA), head dim
h, MLP width m, n_q new tokens attending to n_k keys (prefill: n_q = n_k = n; decode: n_q = 1,
n_k = cache + 1)::

    projections  2·n_q·d·(H·h)  [q]  +  2·2·n_q·d·(H_kv·h)  [k, v]  +  2·n_q·(H·h)·d  [o]
    attention    2·H·n_q·n_k·h  [Q Kᵀ]  +  2·H·n_q·n_k·h  [A V]
    MLP          2·n_q·d·m·3  (gated: gate/up/down, Llama/Qwen2 style)   or   2·n_q·d·m·2  (fc1/fc2)
                 or, in a sparse-MoE layer (Qwen3-VL-MoE), the router 2·n_q·d·E plus the k experts each
                 token is routed to, k·2·n_q·d·m_e·3 (E experts, k = num_experts_per_tok, width m_e)

With H·h = d and H_kv = H this is ``8nd² + 4n²d + 6ndm`` (gated) = 2 × (``4nd² + 2n²d + 3ndm``).
A decode step's n_k is at most the window on sliding-window layers (Gemma 3), whose cache keeps that many
slots; in a prefill every layer multiplies the full n × n (sdpa and eager mask, they do not skip).

lm_head: ``2·d·V`` per position whose logits are computed (``logits_to_keep`` per row; 0 = all).

Vision tower and projector: `tokprune.flops.vision` (every supported family: one formula per encoder
pass, ``2·P·C·v`` for the patch embedding and ``2·n·W + 4·A·Σ_b n_b²`` per layer, W the layer's Linear
widths, A its attention width, n_b its attention blocks; the projector ``2·r·W_proj`` over the rows it
maps). Images, AnyRes tiles, frames and videos each count as the passes the model really runs.

Scoring (`FlopsBreakdown.scoring`) is an *estimate* of the extra matmuls tokprune's signals cost; it is
reported separately and never mixed into the model's own FLOPs. Per signal name:

* ``"cls_attention"`` — towers with a [CLS] (CLIP, InternViT): per pass, one attention row of the
  [CLS] query over the n ViT tokens ``2·n·A``. Towers without (SigLIP, Qwen): the received attention,
  one full ``Q Kᵀ`` per attention block ``2·A·Σ_b n_b²`` (the column sums are reductions, not matmuls).
  The ViT's q/k (Qwen: qkv) projections are not recomputed: the hooks take the ones the attention layer
  computed (`patches.base.ProjectionTap`).
* ``"received_attention"`` — per pass / attention block, one full ``Q Kᵀ`` ``2·A·n_b²``.
* ``"vit_keys"`` — nothing: the keys the layer computed.
* ``"last_query_attention"`` — per row and in-LLM stage: one query row ``2·d·H·h`` and one attention
  row over the n tokens of the layer before the boundary ``2·H·n·h``; the keys come from the KV cache
  (``"cache_keys"``: free, except on a sliding-window layer whose cache of W − 1 slots no longer holds
  all n ≥ W tokens, where the k projection is recomputed ``2·n·d·H_kv·h``).
* ``"text_query_attention"`` — the same per query row, for the row's T instruction tokens (T ≥ 1:
  the last token without an instruction), ``T·(2·d·H·h + 2·H·n·h)``.
* ``"visual_attention"`` — the same for the V visual tokens present in layer b − 1 (each one's row over
  the n tokens; the per-image sums are reductions), ``V·(2·d·H·h + 2·H·n·h)``.
* ``"input_text_relevance"`` — once per row, on the LLM input: the products of its V₀ visual tokens
  with its T instruction tokens, ``2·V₀·T·d`` (the softmax and means are not matmuls).
* ``"keys"`` — per row and stage, the layer's k projection recomputed ``2·n·d·H_kv·h`` (PyramidDrop and
  VisionDrop score at the boundary layer before it runs, so their keys are recomputed).
* ``"hidden"`` — 0 (a norm).
* selection-step work that is not a named signal (see `scoring_signals`): ``"pairwise_cosine"`` —
  DivPrune's n×n cosine matrix per image over the projected embeddings, ``2·n²·d``;
  ``"pivot_similarity"`` — DART's pivot × visual-token similarity, ``2·P·n_vis·d`` with P = 8 pivots.
  VisionZip's target/other key similarity (``2·n·c·h`` with c ≈ 10 contextual tokens) is not counted;
  ``"reprojection"`` — a method on the vision tower's features (`Method.features == "vision"`) has every row
  it rewrote (merged and extra tokens, ``stats.stages[0].merged``) projected again, ``2·W_proj`` per row (the
  main projector; Qwen3-VL's deepstack mergers are not re-run).
* ``"position"``, ``"features"``, ``"vit_cls"`` — 0 (bookkeeping, and tensors the model computes anyway).

LLM-side signals are counted at the stages recorded in the `PruneStats` (``stages[i].where ==
"llm@<b>"``), with n = the row's real tokens in layer b − 1; without stats they count 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tokprune.flops.parts import (
    key_window,
    language_model,
    layer_mlps,
    llm_layer_flops,
    text_dims,
    vocab_size,
)
from tokprune.flops.vision import FAMILIES, VisionCost, vision_cost
from tokprune.signals.llm import ATTENTION_ROWS, NEEDS_KEYS

__all__ = [
    "FlopsBreakdown",
    "VisionCost",
    "decode_step_flops",
    "layer_averaged_tokens",
    "llm_layer_flops",
    "prefill_flops",
    "scoring_signals",
    "supports",
    "vision_cost",
]


DART_PIVOTS = 8


@dataclass
class FlopsBreakdown:
    """FLOPs of one prefill (FlopCounterMode convention: a multiply-add = 2), summed over batch rows."""

    vision: float = 0.0  # vision tower incl. patch embedding
    projector: float = 0.0  # LLaVA multi_modal_projector / Qwen patch merger
    llm_layers: list[float] = field(default_factory=list)  # one entry per decoder layer
    lm_head: float = 0.0
    scoring: float = 0.0  # estimated extra FLOPs of tokprune's signals (0 for none)

    @property
    def llm(self) -> float:
        return float(sum(self.llm_layers))

    @property
    def model(self) -> float:
        """Everything the model itself runs: total minus scoring."""
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def total(self) -> float:
        return self.model + self.scoring

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(llm=self.llm, model=self.model, total=self.total)
        return out


# --------------------------------------------------------------------------------------------- scoring
# signals that cost nothing to give: the engine's bookkeeping and tensors the model computes anyway
FREE_SIGNALS = frozenset({"position", "features", "vit_cls"})


def scoring_signals(methods) -> tuple[str, ...]:
    """The scoring names (signals + selection work) to pass to `prefill_flops` for a Pruner or methods.

    `methods`: a `tokprune.Pruner`, one Method, or a list of them. Adds "keys" for in-LLM methods that
    score at the boundary layer (keys recomputed); a "previous"-layer scorer that needs keys reads them
    from the KV cache instead ("cache_keys": recomputed only where a sliding-window layer's cache no
    longer holds them all); names the selection matmuls ("pairwise_cosine" for DivPrune,
    "pivot_similarity" for DART).
    """
    items = getattr(methods, "methods", methods)
    items = items if isinstance(items, (list, tuple)) else [items]
    names: list[str] = []
    for method in items:
        own = list(method.signals)
        if getattr(method, "where", "pre") == "llm":
            needs_keys = bool(set(own) & NEEDS_KEYS)  # attention rows and the key signals
            own = [n for n in own if n not in NEEDS_KEYS - ATTENTION_ROWS]
            if needs_keys:
                boundary = getattr(method, "score_at", "previous") == "boundary"
                own.append("keys" if boundary else "cache_keys")
        own = [n for n in own if n not in FREE_SIGNALS]
        if getattr(method, "where", "pre") == "pre" and getattr(method, "features", "llm") == "vision":
            own.append("reprojection")
        if method.name == "divprune":
            own.append("pairwise_cosine")
        if method.name == "dart":
            own.append("pivot_similarity")
        names += [n for n in own if n not in names]
    return tuple(names)


CLS_ROWS = {"cls_attention", "cls_logits", "cls_attention_concat"}  # one query row: the [CLS]'s
RECEIVED = {"received_attention", "received_attention_concat"}  # a softmax map streamed over all queries
LOGIT_MEANS = {"logit_column_mean", "logit_row_mean"}  # one mean vector against every token
FREE_VIT = {"vit_keys", "vit_keys_concat"}  # the layer's own projections


def _vision_scoring(cost: VisionCost, signals: set[str]) -> float:
    """ViT-side signal FLOPs. Signals are "base" or "base@layer"; the projections are the layer's own (not
    recomputed), so only the attention products count, per requested layer and pass: a [CLS] query's row
    2·n·A where the tower has a [CLS] (a tower without one gives the received quantity instead), the
    received attention one Q Kᵀ per attention block of that layer 2·A·Σ n_b² (Qwen2.5-VL's windows where the
    layer is windowed), a logit mean 2·n·A."""
    layers: dict[str, set[str]] = {}
    for name in signals:
        base, _, layer = name.partition("@")
        if base in CLS_ROWS | RECEIVED | LOGIT_MEANS | FREE_VIT:
            layers.setdefault(layer, set()).add(base)
    a = cost.attention_width
    total = 0.0
    for layer, bases in layers.items():
        received = bool(bases & RECEIVED) or (bool(bases & CLS_ROWS) and not cost.has_cls)
        for p in cost.passes:
            if bases & CLS_ROWS and cost.has_cls:
                total += 2.0 * p.tokens * a * len(bases & CLS_ROWS)
            if received:
                total += 2.0 * a * sum(b * b for b in cost.blocks_at(p, layer))
            total += 2.0 * p.tokens * a * len(bases & LOGIT_MEANS)
    return total


LLM_SCORED = ATTENTION_ROWS | {"keys", "cache_keys", "pivot_similarity"}


def _llm_scoring(
    text_config, stats, per_row: list[list[int]], signals: set[str], windows: list[int | None]
) -> float:
    """LLM-side signal FLOPs at the stages of `stats`; windows: per layer, its sliding window or None."""
    if stats is None or not signals & (LLM_SCORED | {"input_text_relevance"}):
        return 0.0
    d, heads, kv_heads, head_dim, _ = text_dims(text_config)
    boundaries = [int(s.where.split("@")[1]) for s in stats.stages if s.where.startswith("llm@")]
    instruction = stats.instruction_tokens or [0] * len(per_row)
    total = 0.0
    if boundaries and "input_text_relevance" in signals:  # once, on the LLM input
        for row, tokens in enumerate(per_row):
            total += 2 * max(tokens[0] - stats.text_tokens[row], 0) * max(instruction[row], 1) * d
    for b in boundaries:
        for row, tokens in enumerate(per_row):
            n = tokens[b - 1]
            visual = max(n - stats.text_tokens[row], 0)
            queries = {
                "last_query_attention": 1, "text_query_attention": max(instruction[row], 1),
                "visual_attention": visual,
            }  # fmt: skip
            for name in signals & queries.keys():  # query rows: q projection and one row over n keys
                total += queries[name] * (2 * d * heads * head_dim + 2 * heads * n * head_dim)
            window = windows[b - 1]
            evicted = "cache_keys" in signals and window is not None and n >= window  # cache holds W - 1
            if "keys" in signals or evicted:
                total += 2 * n * d * kv_heads * head_dim
            if "pivot_similarity" in signals:
                total += 2 * DART_PIVOTS * visual * d
    return total


# --------------------------------------------------------------------------------------------- public
def supports(model) -> bool:
    """Whether the FLOPs model knows this model's family (every class tokprune has an adapter for)."""
    return getattr(model.config, "model_type", "") in FAMILIES


def _check_supported(model) -> None:
    if not supports(model):
        raise TypeError(
            f"flops: unsupported model {type(model).__name__} (model_type "
            f"{getattr(model.config, 'model_type', None)!r}); supported: {', '.join(FAMILIES)}"
        )


def _content_tokens(model, inputs: dict) -> list[int]:
    """LLM tokens of every image / video that compete for the budget (separators excluded)."""
    from tokprune.patches import adapter_for

    layout = adapter_for(model).image_layout(inputs)
    if layout is None:
        return []
    return [
        n - (0 if layout.separators_of(i) is None else int(layout.separators_of(i).sum()))
        for i, n in enumerate(layout.counts)
    ]


def _layer_tokens(inputs: dict, stats, num_layers: int, padded: bool) -> list[list[int]]:
    """Tokens every row processes in every decoder layer (its real ones, or the padded batch length)."""
    if stats is not None:
        per_row = [list(t) for t in stats.layer_tokens]
        return [list(stats.layer_lengths) for _ in per_row] if padded else per_row
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if padded or mask is None:
        return [[ids.shape[1]] * num_layers for _ in range(ids.shape[0])]
    return [[int(n)] * num_layers for n in mask.sum(1).tolist()]


def prefill_flops(
    model,
    inputs: dict,
    stats=None,
    logits_to_keep: int = 1,
    signals: tuple[str, ...] = (),
    *,
    padded: bool = False,
) -> FlopsBreakdown:
    """Analytic FLOPs of one prefill `model(**inputs, logits_to_keep=...)`, per component.

    model: any model class tokprune supports (`supports`). inputs: the processor outputs (input_ids,
        attention_mask, pixel values and their sizes / grids, videos). stats: the `PruneStats` of a pruned
        prefill (layer i of row b processed stats.layer_tokens[b][i] real tokens); None = unpruned, every
        layer sees the real (attention_mask) tokens of each row. Padding is not counted (unless
        `padded`); rows are summed.
    signals: scoring names (see the module docstring and `scoring_signals`); counted in `scoring` only.
    padded: count every row at the batch's padded length of each layer (stats.layer_lengths, or the
        input length unpruned), i.e. what a batched forward really multiplies, padding included.
    """
    _check_supported(model)
    lm = language_model(model)
    text_config = lm.config
    vision = vision_cost(model, inputs)
    mlps = layer_mlps(lm)
    per_row = _layer_tokens(inputs, stats, len(mlps), padded)
    llm_layers = [
        sum(llm_layer_flops(text_config, row[i], row[i], mlp=mlp) for row in per_row)
        for i, mlp in enumerate(mlps)
    ]
    d, vocab = text_config.hidden_size, vocab_size(model)
    keep = int(logits_to_keep)
    lm_head = float(sum(2 * d * vocab * (row[-1] if keep <= 0 else min(keep, row[-1])) for row in per_row))

    wanted = set(signals)
    scoring = _vision_scoring(vision, wanted)
    scoring += _llm_scoring(text_config, stats, per_row, wanted, key_window(lm))
    if "pairwise_cosine" in wanted:
        scoring += sum(2 * n * n * d for n in _content_tokens(model, inputs))
    if "reprojection" in wanted and stats is not None:  # merged rows of a method on the features, projected
        rewritten = sum(
            int(m.numel()) for stage in stats.stages if stage.where == "pre" for m in stage.merged
        )
        scoring += vision.row_projection * rewritten
    return FlopsBreakdown(
        vision=float(vision.vision),
        projector=float(vision.projector),
        llm_layers=[float(x) for x in llm_layers],
        lm_head=lm_head,
        scoring=float(scoring),
    )


def decode_step_flops(model, cache_lengths: list[list[int]]) -> float:
    """FLOPs of one decode step generating one token per row.

    cache_lengths[row][layer]: keys already in that layer's cache before the step (pruned layers hold
    fewer). Each layer costs llm_layer_flops(cfg, 1, keys) with keys = cache + 1, at most the window on a
    sliding-window layer (Gemma 3's cache keeps that many slots); plus the lm_head on one position per row.
    """
    _check_supported(model)
    lm = language_model(model)
    text_config = lm.config
    mlps, windows = layer_mlps(lm), key_window(lm)
    per_token_head = 2 * text_config.hidden_size * vocab_size(model)
    total = 0.0
    for row in cache_lengths:
        for c, mlp, window in zip(row, mlps, windows):
            keys = c + 1 if window is None else min(c + 1, window)
            total += llm_layer_flops(text_config, 1, keys, mlp=mlp)
        total += per_token_head
    return float(total)


def layer_averaged_tokens(layer_tokens: list[int]) -> float:
    """Mean token count over layers, Σ_i (L_{i+1} − L_i)·T_i / L (DESIGN §6)."""
    if not layer_tokens:
        return 0.0
    return float(sum(layer_tokens)) / len(layer_tokens)
