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

With H·h = d and H_kv = H this is ``8nd² + 4n²d + 6ndm`` (gated) = 2 × (``4nd² + 2n²d + 3ndm``).

lm_head: ``2·d·V`` per position whose logits are computed (``logits_to_keep`` per row; 0 = all).

Vision, LLaVA (CLIP ViT, width C, MLP width m_v, L_v layers, patch p, P patches, n = P + 1 with [CLS]),
per image: patch conv ``2·P·C·(3·p²)``; every encoder layer ``8·n·C² + 4·n²·C + 4·n·C·m_v`` (transformers
runs all L_v layers even when ``vision_feature_layer`` = -2; the post-layernorm is not a matmul).
Projector: ``2·r·(C·k·d + d·d)`` for the r = P (or P + 1 with strategy "full") features of each image,
k = number of feature layers concatenated.

Vision, Qwen2-VL / Qwen2.5-VL (width C, S patches in all, patch volume c·t·p², merge unit u = s²)::

    patch_embed  2·S·C·(c·t·p²)
    each block   8·S·C²  (qkv + proj)  +  4·C·Σ_b n_b²  (attention within each block of n_b patches)
                 + MLP  2·S·C·m_v·2  (Qwen2-VL fc1/fc2, m_v = C·mlp_ratio)  or  2·S·C·m_v·3  (2.5-VL, gated)
    merger       2·(S/u)·(u·C)·(u·C)  +  2·(S/u)·(u·C)·d_out

The attention blocks are the frames of each image (``cu_seqlens``) for full-attention blocks and, on
Qwen2.5-VL's windowed blocks, the windows of ``get_vision_window_index`` (``cu_window_seqlens``).

Scoring (`FlopsBreakdown.scoring`) is an *estimate* of the extra matmuls tokprune's signals cost; it is
reported separately and never mixed into the model's own FLOPs. Per signal name:

* ``"cls_attention"`` — LLaVA: per image, one attention row of the [CLS] query over the n ViT tokens
  ``2·n·C``. Qwen: the received attention, one full ``Q Kᵀ`` per attention block ``2·C·Σ_b n_b²`` (the
  column sums are reductions, not matmuls). The ViT's q/k (Qwen: qkv) projections are not recomputed:
  the hooks take the ones the attention layer computed (`patches.base.ProjectionTap`).
* ``"received_attention"`` — per image / attention block, one full ``Q Kᵀ`` ``2·n²·C``.
* ``"vit_keys"`` — nothing: the keys the layer computed.
* ``"last_query_attention"`` — per row and in-LLM stage: one query row ``2·d·H·h`` and one attention
  row over the n tokens of the layer before the boundary ``2·H·n·h``; the keys come from the KV cache.
* ``"text_query_attention"`` — the same per query row, for the row's T instruction tokens (T ≥ 1:
  the last token without an instruction), ``T·(2·d·H·h + 2·H·n·h)``.
* ``"visual_attention"`` — the same for the V visual tokens present in layer b − 1 (each one's row over
  the n tokens; the per-image sums are reductions), ``V·(2·d·H·h + 2·H·n·h)``.
* ``"input_text_relevance"`` — once per row, on the LLM input: the products of its V₀ visual tokens
  with its T instruction tokens, ``2·V₀·T·d`` (the softmax and means are not matmuls).
* ``"keys"`` — per row and stage, the layer's k projection recomputed ``2·n·d·H_kv·h`` (PyramidDrop scores
  at the boundary layer before it runs, so its keys are recomputed; with a cache DART reads them free, so
  counting them for DART is an upper bound).
* ``"hidden"`` — 0 (a norm).
* selection-step work that is not a named signal (see `scoring_signals`): ``"pairwise_cosine"`` —
  DivPrune's n×n cosine matrix per image over the projected embeddings, ``2·n²·d``;
  ``"pivot_similarity"`` — DART's pivot × visual-token similarity, ``2·P·n_vis·d`` with P = 8 pivots.
  VisionZip's target/other key similarity (``2·n·c·h`` with c ≈ 10 contextual tokens) is not counted.

LLM-side signals are counted at the stages recorded in the `PruneStats` (``stages[i].where ==
"llm@<b>"``), with n = the row's real tokens in layer b − 1; without stats they count 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tokprune.flops.parts import (
    CLIP_FAMILIES,
    Images,
    images_of,
    llava_vision,
    llm_gated,
    llm_layer_flops,
    model_family,
    qwen_vision,
    text_dims,
    vocab_size,
)
from tokprune.signals.llm import ATTENTION_ROWS

__all__ = [
    "FlopsBreakdown",
    "decode_step_flops",
    "layer_averaged_tokens",
    "llm_layer_flops",
    "prefill_flops",
    "scoring_signals",
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
def scoring_signals(methods) -> tuple[str, ...]:
    """The scoring names (signals + selection work) to pass to `prefill_flops` for a Pruner or methods.

    `methods`: a `tokprune.Pruner`, one Method, or a list of them. Adds "keys" for in-LLM methods that
    score at the boundary layer (keys recomputed), drops "keys" where they come from the KV cache (a
    "previous"-layer scorer), and names the selection matmuls ("pairwise_cosine" for DivPrune,
    "pivot_similarity" for DART).
    """
    items = getattr(methods, "methods", methods)
    items = items if isinstance(items, (list, tuple)) else [items]
    names: list[str] = []
    for method in items:
        own = list(method.signals)
        if getattr(method, "where", "pre") == "llm":
            if getattr(method, "score_at", "previous") == "boundary":
                if set(own) & ATTENTION_ROWS and "keys" not in own:
                    own.append("keys")
            elif "keys" in own:
                own.remove("keys")
        if method.name == "divprune":
            own.append("pairwise_cosine")
        if method.name == "dart":
            own.append("pivot_similarity")
        names += [n for n in own if n not in names]
    return tuple(names)


def _vision_scoring(model, inputs: dict, images: Images, signals: set[str]) -> float:
    """ViT-side signal FLOPs. Signals are "base" or "base@layer"; the projections are the layer's own (not
    recomputed), so only the attention products count. Qwen blocks are counted with their full-image
    attention blocks (windowed blocks cost less: an upper bound there)."""
    layers: dict[str, set[str]] = {}
    for name in signals:
        base, _, layer = name.partition("@")
        if base in {"cls_attention", "received_attention", "vit_keys"}:
            layers.setdefault(layer, set()).add(base)
    if not images.vit_tokens or not layers:
        return 0.0
    total = 0.0
    if model_family(model) in CLIP_FAMILIES:
        c = model.config.vision_config.hidden_size
        for bases in layers.values():
            for n in images.vit_tokens:
                if "cls_attention" in bases:
                    total += 2 * n * c  # the [CLS] query's attention row
                if "received_attention" in bases:
                    total += 2 * n * n * c  # Q Kᵀ streamed over query blocks
        return total
    vc = model.config.vision_config
    c = vc.embed_dim if model_family(model) == "qwen2_vl" else vc.hidden_size
    for bases in layers.values():
        if bases & {"cls_attention", "received_attention"}:  # the same received-attention pass
            total += sum(2 * n * n * c for blocks in images.full_blocks for n in blocks)  # Q Kᵀ per block
    return total


LLM_SCORED = ATTENTION_ROWS | {"keys", "pivot_similarity"}


def _llm_scoring(model, stats, per_row: list[list[int]], signals: set[str]) -> float:
    if stats is None or not signals & (LLM_SCORED | {"input_text_relevance"}):
        return 0.0
    d, heads, kv_heads, head_dim, _ = text_dims(model.config.text_config)
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
            if "keys" in signals:
                total += 2 * n * d * kv_heads * head_dim
            if "pivot_similarity" in signals:
                total += 2 * DART_PIVOTS * visual * d
    return total


# --------------------------------------------------------------------------------------------- public
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

    model: LlavaForConditionalGeneration / Qwen2VLForConditionalGeneration /
        Qwen2_5_VLForConditionalGeneration. inputs: the processor outputs (input_ids, attention_mask,
        pixel_values, image_grid_thw). stats: the `PruneStats` of a pruned prefill (layer i of row b
        processed stats.layer_tokens[b][i] real tokens); None = unpruned, every layer sees the real
        (attention_mask) tokens of each row. Padding is not counted (unless `padded`); rows are summed.
    signals: scoring names (see the module docstring and `scoring_signals`); counted in `scoring` only.
    padded: count every row at the batch's padded length of each layer (stats.layer_lengths, or the
        input length unpruned), i.e. what a batched forward really multiplies, padding included.
    """
    family = model_family(model)
    text_config = model.config.text_config
    images = images_of(model, inputs)
    if family in CLIP_FAMILIES:
        vision, projector = llava_vision(model, images)
    else:
        vision, projector = qwen_vision(model, inputs, images) if images.vit_tokens else (0.0, 0.0)

    num_layers = text_config.num_hidden_layers
    if stats is not None:
        per_row = [list(t) for t in stats.layer_tokens]
        if padded:
            per_row = [list(stats.layer_lengths) for _ in per_row]
    elif padded:
        ids = inputs["input_ids"]
        per_row = [[ids.shape[1]] * num_layers for _ in range(ids.shape[0])]
    else:
        mask = inputs.get("attention_mask")
        if mask is None:
            ids = inputs["input_ids"]
            real = [ids.shape[1]] * ids.shape[0]
        else:
            real = [int(v) for v in mask.sum(1).tolist()]
        per_row = [[n] * num_layers for n in real]
    gated = llm_gated(model)
    llm_layers = [
        sum(llm_layer_flops(text_config, row[i], row[i], gated=gated) for row in per_row)
        for i in range(num_layers)
    ]
    d, vocab = text_config.hidden_size, vocab_size(model)
    keep = int(logits_to_keep)
    lm_head = float(sum(2 * d * vocab * (row[-1] if keep <= 0 else min(keep, row[-1])) for row in per_row))

    wanted = set(signals)
    scoring = _vision_scoring(model, inputs, images, wanted) + _llm_scoring(model, stats, per_row, wanted)
    if "pairwise_cosine" in wanted:
        scoring += sum(2 * n * n * text_config.hidden_size for n in images.llm_tokens)
    return FlopsBreakdown(
        vision=float(vision),
        projector=float(projector),
        llm_layers=[float(x) for x in llm_layers],
        lm_head=lm_head,
        scoring=float(scoring),
    )


def decode_step_flops(model, cache_lengths: list[list[int]]) -> float:
    """FLOPs of one decode step generating one token per row.

    cache_lengths[row][layer]: keys already in that layer's cache before the step (pruned layers hold
    fewer). Each layer costs llm_layer_flops(cfg, 1, cache + 1); plus the lm_head on one position per row.
    """
    text_config = model.config.text_config
    gated = llm_gated(model)
    per_token_head = 2 * text_config.hidden_size * vocab_size(model)
    total = 0.0
    for row in cache_lengths:
        total += sum(llm_layer_flops(text_config, 1, c + 1, gated=gated) for c in row)
        total += per_token_head
    return float(total)


def layer_averaged_tokens(layer_tokens: list[int]) -> float:
    """Mean token count over layers, Σ_i (L_{i+1} − L_i)·T_i / L (DESIGN §6)."""
    if not layer_tokens:
        return 0.0
    return float(sum(layer_tokens)) / len(layer_tokens)
