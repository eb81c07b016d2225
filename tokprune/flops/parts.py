"""FLOPs of one decoder layer of the language model: GQA projections, attention, and a gated, plain or
mixture-of-experts MLP. The conventions are in `tokprune.flops`; the vision side is in
`tokprune.flops.vision`."""

from __future__ import annotations

from torch import nn

from tokprune.core.masks import layer_type

# model_type of text configs whose decoder MLP is a plain fc1/fc2 pair (everything else is taken as gated)
_UNGATED_TEXT_MODELS = frozenset(
    {"gpt2", "opt", "phi", "gpt_neox", "gptj", "falcon", "bloom", "starcoder2", "gpt_bigcode"}
)


def text_dims(cfg) -> tuple[int, int, int, int, int]:
    """(d, H, H_kv, head_dim, m) of a decoder config."""
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    return d, heads, kv_heads, head_dim, cfg.intermediate_size


def _is_gated(cfg) -> bool:
    return getattr(cfg, "model_type", "") not in _UNGATED_TEXT_MODELS


def dense_mlp_flops(cfg, gated: bool | None = None) -> float:
    """FLOPs per token of a dense MLP of width m: 2·d·m·3 gated (gate/up/down), 2·d·m·2 plain."""
    d, *_, m = text_dims(cfg)
    if gated is None:
        gated = _is_gated(cfg)
    return 2.0 * d * m * (3 if gated else 2)


def moe_mlp_flops(cfg) -> float:
    """FLOPs per token of a sparse-MoE block: the router over E experts, 2·d·E, plus the k experts the
    token is routed to (num_experts_per_tok), each a gated MLP of width moe_intermediate_size: 2·d·m·3."""
    d = cfg.hidden_size
    experts, top_k, width = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    return 2.0 * d * experts + top_k * 2.0 * d * width * 3


def mlp_flops_per_token(layer: nn.Module, cfg) -> float:
    """FLOPs per token of a decoder layer's MLP, by what the module is: a sparse-MoE block (routed experts,
    Qwen3-VL-MoE), a gated MLP (gate_proj) or a plain one."""
    mlp = layer.mlp
    if hasattr(mlp, "experts"):
        return moe_mlp_flops(cfg)
    return dense_mlp_flops(cfg, gated=hasattr(mlp, "gate_proj"))


def llm_layer_flops(
    text_config, n_query: int, n_key: int, *, gated: bool | None = None, mlp: float | None = None
) -> float:
    """FLOPs of one decoder layer: n_query new tokens, each attending to n_key keys (all heads).

    q/k/v/o projections with GQA (num_key_value_heads, head_dim), Q Kᵀ and A V over n_key keys, and the
    MLP: `mlp` FLOPs per token where given (`mlp_flops_per_token` of the real layer: MoE or dense), else a
    dense MLP, gated (SwiGLU, 3 matrices) or not (2); `gated=None` infers it from the config's model_type
    (Llama, Qwen2, Mistral, Gemma, … are gated).
    """
    d, heads, kv_heads, head_dim, _ = text_dims(text_config)
    nq, nk = int(n_query), int(n_key)
    if nq <= 0:
        return 0.0
    proj = (
        2 * nq * d * heads * head_dim + 2 * 2 * nq * d * kv_heads * head_dim + 2 * nq * heads * head_dim * d
    )
    attention = 2 * 2 * heads * nq * nk * head_dim
    per_token = dense_mlp_flops(text_config, gated) if mlp is None else mlp
    return float(proj + attention + nq * per_token)


def language_model(model) -> nn.Module:
    """The decoder stack of a supported VLM (`model.model.language_model`; SmolVLM's `text_model`)."""
    from tokprune.patches import adapter_for

    return adapter_for(model).language_model


def layer_mlps(lm: nn.Module) -> list[float]:
    """FLOPs per token of every decoder layer's MLP; lm: the decoder stack (`language_model`)."""
    return [mlp_flops_per_token(layer, lm.config) for layer in lm.layers]


def key_window(lm: nn.Module) -> list[int | None]:
    """Per decoder layer of `lm`, the keys a decode step attends at most (sliding-window layers: the window,
    whose cache keeps only that many slots); None for full-attention layers."""
    cfg = lm.config
    window = getattr(cfg, "sliding_window", None)
    return [
        window if layer_type(cfg, j) == "sliding_attention" and window else None
        for j in range(len(lm.layers))
    ]


def vocab_size(model) -> int:
    head = getattr(model, "lm_head", None)
    return int(getattr(head, "out_features", 0) or model.config.text_config.vocab_size)
