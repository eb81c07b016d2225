"""tokprune.flops: the analytic FLOPs model against torch.utils.flop_counter on the tiny models."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from tiny_models import BUILDERS, batch_inputs, process, prompt_text, rand_image
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import LlamaConfig

import tokprune
from tokprune.core.compat import CACHE_KWARG, output_cache
from tokprune.flops import (
    FlopsBreakdown,
    decode_step_flops,
    layer_averaged_tokens,
    llm_layer_flops,
    prefill_flops,
    scoring_signals,
)
from tokprune.flops.parts import language_model, layer_mlps

FAMILIES = tuple(BUILDERS)  # every supported model class
# eager attention is counted as bmm, sdpa as one kernel: both on a CLIP, a Qwen and a Gemma 3 tower/LLM
# (mask dict, sliding layers); the other families run sdpa only, to keep the suite's time in bounds
EAGER_TOO = ("llava", "qwen2_5_vl", "gemma3")
ATTN_CASES = [(f, a) for f in FAMILIES for a in (("sdpa", "eager") if f in EAGER_TOO else ("sdpa",))]
TOLERANCE = 0.02


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """(T, K) tokens grouped over experts times (G, K, N) expert weights: each token meets one expert."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


# CPU sdpa runs aten._scaled_dot_product_flash_attention_for_cpu, which FlopCounterMode does not know;
# count it like the CUDA sdpa kernels (full n_q x n_k, GQA-aware). Eager attention is counted as bmm.
# transformers runs MoE experts (Qwen3-VL-MoE) through aten._grouped_mm, which the counter does not know
# either (it would count the router alone).
MAPPING = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    torch.ops.aten._grouped_mm: _grouped_mm,
}


def count(fn) -> FlopCounterMode:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=MAPPING) as counter:
        fn()
    return counter


def rel(estimate: float, measured: float) -> float:
    return abs(estimate / measured - 1.0)


def equal_rows(family: str, proc) -> dict:
    """Two rows of the same length (same prompt, same image size, different pixels): no padding."""
    texts = [prompt_text(family, 1, "describe the image please")] * 2
    images = [[rand_image(112, 112, seed)] for seed in (0, 1)]
    return process(family, proc, texts, images, padding=True)


def make_inputs(family: str, proc, layout: str) -> dict:
    if layout == "one":
        return batch_inputs(family, proc, (1,))
    if layout == "two_images":  # one row, two images (Qwen: 8x8 and 8x12 patch grids)
        return batch_inputs(family, proc, (2,))
    inputs = equal_rows(family, proc)
    assert bool(inputs["attention_mask"].all())
    return inputs


# family -> (the vision module, the projector modules) in FlopCounterMode's names; Qwen's merger (and
# Qwen3-VL's deepstack mergers) sit inside `.visual`, whose own count is tower + merger
QWEN_MERGERS = (".visual.merger",)
COMPONENTS = {
    "qwen2_vl": (".visual", QWEN_MERGERS),
    "qwen2_5_vl": (".visual", QWEN_MERGERS),
    "qwen3_vl": (".visual", (*QWEN_MERGERS, *(f".visual.deepstack_merger_list.{i}" for i in range(3)))),
    "qwen3_vl_moe": (".visual", (*QWEN_MERGERS, *(f".visual.deepstack_merger_list.{i}" for i in range(3)))),
    "smolvlm": (".vision_model", (".connector",)),
    "idefics3": (".vision_model", (".connector",)),
}


def module_flops(counter: FlopCounterMode, suffix: str) -> int:
    """FLOPs FlopCounterMode attributed to the (unique) module whose name ends with `suffix`."""
    names = [name for name in counter.get_flop_counts() if name.endswith(suffix)]
    assert len(names) == 1, (suffix, names)
    return sum(counter.get_flop_counts()[names[0]].values())


# ------------------------------------------------------------------------------------------ unpruned
@pytest.mark.parametrize("layout", ["one", "two_images", "equal_rows"])
@pytest.mark.parametrize(("family", "attn"), ATTN_CASES)
def test_unpruned_prefill_matches_flop_counter(tiny, family, attn, layout):
    model, proc = tiny(family, attn)
    inputs = make_inputs(family, proc, layout)
    measured = count(lambda: model(**inputs, logits_to_keep=1)).get_total_flops()
    estimate = prefill_flops(model, inputs)
    assert estimate.scoring == 0
    assert rel(estimate.total, measured) < TOLERANCE, (estimate.total, measured)


@pytest.mark.parametrize("family", FAMILIES)
def test_component_split_matches_flop_counter(tiny, family):
    """vision / projector / every LLM layer / lm_head against FlopCounterMode's per-module counts."""
    model, proc = tiny(family, "eager")
    inputs = make_inputs(family, proc, "two_images")
    counter = count(lambda: model(**inputs, logits_to_keep=1))
    est = prefill_flops(model, inputs)
    vision_name, projector_names = COMPONENTS.get(family, (".vision_tower", (".multi_modal_projector",)))
    projector = sum(module_flops(counter, name) for name in projector_names)
    vision = module_flops(counter, vision_name) - (projector if vision_name == ".visual" else 0)
    assert rel(est.vision, vision) < TOLERANCE
    assert rel(est.projector, projector) < TOLERANCE
    layers = ".text_model.layers" if family in ("smolvlm", "idefics3") else ".language_model.layers"
    for i, layer in enumerate(est.llm_layers):
        assert rel(layer, module_flops(counter, f"{layers}.{i}")) < TOLERANCE
    assert rel(est.lm_head, module_flops(counter, ".lm_head")) < TOLERANCE

    # the vision tower alone (+ projector / merger, which get_image_features runs too)
    wanted = inspect.signature(model.model.get_image_features).parameters
    kwargs = {k: v for k, v in inputs.items() if k in wanted and k != "pixel_values"}
    image_only = count(lambda: model.model.get_image_features(inputs["pixel_values"], **kwargs))
    assert rel(est.vision + est.projector, image_only.get_total_flops()) < TOLERANCE


def test_siglip_pooling_head_is_counted(tiny):
    """A SigLIP tower that runs its attention-pooling head (vision_use_head) is counted with it."""
    model, proc = tiny("gemma3", "sdpa")
    config = copy.deepcopy(model.config)
    config.vision_config.vision_use_head = True
    torch.manual_seed(0)
    with_head = type(model)(config).eval()
    assert with_head.model.vision_tower.head is not None
    inputs = make_inputs("gemma3", proc, "two_images")
    measured = count(lambda: with_head.model.get_image_features(inputs["pixel_values"])).get_total_flops()
    est = prefill_flops(with_head, inputs)
    assert est.vision > prefill_flops(model, inputs).vision
    assert rel(est.vision + est.projector, measured) < 1e-9


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep_zero_counts_every_position(tiny, family):
    model, proc = tiny(family, "sdpa")
    inputs = make_inputs(family, proc, "one")
    measured = count(lambda: model(**inputs, logits_to_keep=0)).get_total_flops()
    est = prefill_flops(model, inputs, logits_to_keep=0)
    n = int(inputs["attention_mask"].sum())
    assert est.lm_head == 2 * model.config.text_config.hidden_size * model.lm_head.out_features * n
    assert rel(est.total, measured) < TOLERANCE


# ------------------------------------------------------------------------------------------ pruned
@pytest.mark.parametrize("layout", ["one", "equal_rows"])
@pytest.mark.parametrize(
    "method", ["fastv", "pdrop", "divprune", "visionzip", "dart", "sparsevlm", "visiondrop", "mustdrop"]
)
@pytest.mark.parametrize(("family", "attn"), ATTN_CASES)
def test_pruned_prefill_matches_flop_counter(tiny, family, method, layout, attn):
    """The model part within 2% of the counter minus the scoring; the counter between the two totals."""
    model, proc = tiny(family, attn)
    inputs = make_inputs(family, proc, layout)
    budget = {"budget": 8} if method in ("visionzip", "dart") else {"keep_ratio": 0.25}
    with tokprune.apply(model, method, **budget) as pruner:
        measured = count(lambda: model(**inputs, logits_to_keep=1)).get_total_flops()
        stats = pruner.stats
        est = prefill_flops(model, inputs, stats, signals=scoring_signals(pruner))
    unpruned = prefill_flops(model, inputs)
    assert est.model < unpruned.model
    assert est.scoring > 0
    assert rel(est.model, measured - est.scoring) < TOLERANCE
    # the scoring estimate is what the signals really cost. VisionZip's contextual merge and MustDrop's
    # window similarities are selection matmuls the estimate does not model: there it is a lower bound and
    # the rest stays under 0.2 % of the model's FLOPs (0.006 % and 0.14 % here; 17 % and 48 % of the estimate)
    extra = measured - est.model
    if method in ("visionzip", "mustdrop"):
        assert est.scoring <= extra < est.scoring + 2e-3 * est.model
    else:
        assert rel(est.scoring, extra) < 0.1
    assert est.model <= measured <= est.total * (1 + TOLERANCE)
    # every layer is counted at the length it really saw
    cfg = model.config.text_config
    for i, (layer, mlp) in enumerate(zip(est.llm_layers, layer_mlps(language_model(model)))):
        assert layer == sum(llm_layer_flops(cfg, row[i], row[i], mlp=mlp) for row in stats.layer_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_method_signals_bracket_the_counter(tiny, family):
    """Called with a method's own `signals` (as a harness may), the estimate leaves out the selection
    matmuls (DivPrune's pairwise cosine) and the key projections: a lower bound, which
    `scoring_signals` completes."""
    model, proc = tiny(family, "sdpa")
    inputs = make_inputs(family, proc, "one")
    for method in ("fastv", "pdrop", "divprune"):
        with tokprune.apply(model, method, keep_ratio=0.25) as pruner:
            measured = count(lambda: model(**inputs, logits_to_keep=1)).get_total_flops()
            raw = prefill_flops(model, inputs, pruner.stats, signals=pruner.methods[-1].signals)
            full = prefill_flops(model, inputs, pruner.stats, signals=scoring_signals(pruner))
        assert raw.model <= measured and raw.total <= full.total, method
        assert rel(full.total, measured) < TOLERANCE, method


# ------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("method", [None, "fastv", "pdrop"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decode_step_matches_flop_counter(tiny, family, method):
    model, proc = tiny(family, "sdpa")
    inputs = make_inputs(family, proc, "one")
    pruner = tokprune.apply(model, method, keep_ratio=0.25) if method else None
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], 1)
        # the position's value does not change FLOPs; Qwen needs explicit M-RoPE rows when unpatched
        kwargs = {"position_ids": torch.full((3, 1, 1), mask.shape[1])} if family.startswith("qwen") else {}
        measured = count(
            lambda: model(
                input_ids=token,
                attention_mask=mask,
                **{CACHE_KWARG: output_cache(out)},
                logits_to_keep=1,
                **kwargs,
            )
        ).get_total_flops()
        num_layers = model.config.text_config.num_hidden_layers
        cache = pruner.stats.layer_tokens if pruner else [[inputs["attention_mask"].shape[1]] * num_layers]
    finally:
        if pruner:
            pruner.remove()
    assert rel(decode_step_flops(model, cache), measured) < TOLERANCE


# ------------------------------------------------------------------------------------------ formulas
def test_llm_layer_flops_by_hand_gqa_gated():
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        num_hidden_layers=2,
        vocab_size=1000,
    )
    d, m, h, hkv, hd, n = 4096, 14336, 32, 8, 128, 700
    proj = 2 * n * d * (h * hd) + 2 * 2 * n * d * (hkv * hd) + 2 * n * (h * hd) * d
    attention = 2 * 2 * h * n * n * hd
    mlp = 3 * 2 * n * d * m
    assert llm_layer_flops(cfg, n, n) == proj + attention + mlp
    assert llm_layer_flops(cfg, n, n, gated=False) == proj + attention + 2 * 2 * n * d * m
    # decode: one query against cache + 1 keys
    assert llm_layer_flops(cfg, 1, n + 1) == (
        2 * d * h * hd + 2 * 2 * d * hkv * hd + 2 * h * hd * d + 2 * 2 * h * (n + 1) * hd + 3 * 2 * d * m
    )
    # without GQA it is exactly twice the multiply-add count 4nd² + 2n²d + 3ndm
    mha = LlamaConfig(hidden_size=d, intermediate_size=m, num_attention_heads=h, num_key_value_heads=h)
    assert llm_layer_flops(mha, n, n) == 2 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
    assert llm_layer_flops(cfg, 0, 10) == 0


def test_layer_averaged_tokens():
    assert layer_averaged_tokens([576, 576, 288, 288]) == 432
    assert layer_averaged_tokens([10] * 7) == 10
    assert layer_averaged_tokens([]) == 0


def test_breakdown_total_and_dict():
    b = FlopsBreakdown(vision=1.0, projector=2.0, llm_layers=[3.0, 4.0], lm_head=5.0, scoring=6.0)
    assert b.total == 21.0 and b.model == 15.0
    d = b.as_dict()
    assert d["llm_layers"] == [3.0, 4.0] and d["total"] == 21.0 and d["scoring"] == 6.0


def test_scoring_signals_names():
    from tokprune.methods import make_method

    # keys: recomputed at the boundary layer (PyramidDrop) or read from the KV cache ("cache_keys")
    assert scoring_signals(make_method("fastv", {})) == ("last_query_attention", "cache_keys")
    assert scoring_signals(make_method("pdrop", {})) == ("last_query_attention", "keys")
    assert scoring_signals(make_method("dart", {})) == (
        "hidden",
        "cache_keys",
        "pivot_similarity",
    )  # "position" is free
    assert scoring_signals(make_method("divprune", {})) == ("pairwise_cosine",)
    sparsevlm = ("text_query_attention", "input_text_relevance", "cache_keys")
    assert scoring_signals(make_method("sparsevlm", {})) == sparsevlm
    assert scoring_signals(make_method("sparsevlm", {"raters": "attention"})) == (sparsevlm[0], sparsevlm[2])
    assert scoring_signals([make_method("visionzip", {}), make_method("fastv", {})]) == (
        "cls_attention",
        "vit_keys",
        "reprojection",  # its merged rows are projected again (it merges before the projector)
        "last_query_attention",
        "cache_keys",
    )
    assert "reprojection" not in scoring_signals(
        make_method("visionzip", {"merge_space": "llm", "cls_token": False})
    )


def test_unsupported_model_is_rejected():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1, vocab_size=10
        )
    )
    with pytest.raises(TypeError, match="unsupported"):
        prefill_flops(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})


@pytest.mark.parametrize("method", [None, "fastv", "pdrop", "divprune"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch(tiny, family, method):
    """Left-padded rows of different lengths: padded=True counts what the batched forward multiplies."""
    model, proc = tiny(family, "sdpa")
    inputs = batch_inputs(family, proc, (1, 1))
    assert not bool(inputs["attention_mask"].all())
    pruner = tokprune.apply(model, method, keep_ratio=0.25) if method else None
    try:
        measured = count(lambda: model(**inputs, logits_to_keep=1)).get_total_flops()
        stats = pruner.stats if pruner else None
        signals = scoring_signals(pruner) if pruner else ()
        real = prefill_flops(model, inputs, stats, signals=signals)
        padded = prefill_flops(model, inputs, stats, signals=signals, padded=True)
    finally:
        if pruner:
            pruner.remove()
    assert real.model < padded.model
    assert rel(padded.model, measured - padded.scoring) < TOLERANCE
