"""DESIGN §8 invariants for every registered method x model x attention backend.

A new method or model joins this matrix automatically (methods from the registry, models from
tiny_models.BUILDERS).
"""

import math

import pytest
import torch
from checks import skip_without_tiles
from reference import (
    LMInputRecorder,
    StageInputRecorder,
    assert_prefill_matches,
    assert_steps_match,
    language_model,
    llm_order,
    original_positions,
    present_after,
    reference_logits,
    stage_plan,
)
from tiny_models import BUILDERS, batch_inputs, image_counts
from tokprune.patches import ADAPTERS, Adapter, adapter_for

import tokprune
from tokprune.core.layout import image_rows
from tokprune.errors import ReproductionError, UnsupportedModelError
from tokprune.methods import REGISTRY, LLMMethod

METHODS = tokprune.available_methods()
FAMILIES = list(BUILDERS)
BACKENDS = ["sdpa", "eager"]
NEW_TOKENS = 3
# options a method needs on the tiny models (2-3 layer vision towers); defaults everywhere else
TINY_OPTIONS = {"vtc_cls": {"start_layer": -2, "end_layer": -1}}
TOL = 1e-5  # relative to the largest |logit| of the compared tensors (float32 summation-order noise)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _refuses_without_tiles(model, method) -> bool:
    """AnyRes-only methods (`needs_tiles`) on a model without tiles: apply() must refuse them early,
    naming the models that have tiles, and install nothing. True when that was the case checked."""
    if not REGISTRY[method].needs_tiles or adapter_for(model).tiles:
        return False
    hooks = _hook_count(model)
    with pytest.raises(UnsupportedModelError, match="models with tiles: .*ForConditionalGeneration"):
        tokprune.apply(model, method, keep_ratio=0.25, **TINY_OPTIONS.get(method, {}))
    assert not hasattr(model, "_tokprune_pruner")
    assert _hook_count(model) == hooks
    return True


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [m for m in METHODS if REGISTRY[m].needs_tiles])
def test_anyres_only_methods_need_tiles(tiny, family, method):
    """On a model without AnyRes tiles apply() refuses an AnyRes-only method (the matrix skips those
    cases); on a model with tiles it installs, and remove() takes every hook off again."""
    model, _ = tiny(family, "sdpa")
    if _refuses_without_tiles(model, method):
        return
    hooks = _hook_count(model)
    tokprune.apply(model, method, keep_ratio=0.25, **TINY_OPTIONS.get(method, {})).remove()
    assert _hook_count(model) == hooks and not hasattr(model, "_tokprune_pruner")


_UNPATCHED: dict = {}


def unpatched_outputs(family: str, attn: str, batch: str, inputs: dict) -> tuple:
    """(prefill logits, generated tokens, per-step logits) of a freshly built, never patched model on
    `inputs`, computed once per (family, attn, batch); batch: a name of `inputs` that no other batch of
    the same family uses (a layout)."""
    key = (family, attn, batch)
    if key not in _UNPATCHED:
        model, _ = BUILDERS[family](attn)
        _UNPATCHED[key] = (_prefill(model, inputs), *_generate(model, inputs))
    return _UNPATCHED[key]


def assert_same_outputs(got: tuple, expected: tuple) -> None:
    """Bit-identical (prefill logits, generated tokens, per-step logits)."""
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    assert len(got[2]) == len(expected[2]) and all(torch.equal(a, b) for a, b in zip(got[2], expected[2]))


def assert_restored(model, inputs: dict, expected: tuple) -> None:
    """After remove(): prefill and generate() are bit-identical to `expected` (`unpatched_outputs`)."""
    assert_same_outputs((_prefill(model, inputs), *_generate(model, inputs)), expected)


def _generate(model, inputs):
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            suppress_tokens=_special_ids(
                model
            ),  # a generated image token would change the reference's layout
        )
    return out.sequences[:, inputs["input_ids"].shape[1] :], out.logits


def _prefill(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_bit_identical(tiny, family, attn, method):
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    inputs = batch_inputs(family, proc, LAYOUTS["1+2"])
    assert_keep_all_identical(model, inputs, method, unpatched_outputs(family, attn, "1+2", inputs))


def assert_keep_all_identical(model, inputs: dict, method: str, expected: tuple | None = None) -> None:
    """keep_ratio=1.0 gives bit-identical prefill logits, generated tokens and per-step logits.

    expected: the unpatched model's (prefill logits, tokens, steps); None: computed here before applying."""
    if expected is None:
        expected = (_prefill(model, inputs), *_generate(model, inputs))
    with tokprune.apply(model, method, keep_ratio=1.0, **TINY_OPTIONS.get(method, {})):
        assert_same_outputs((_prefill(model, inputs), *_generate(model, inputs)), expected)


def _expected_layer_tokens(pruner, inputs, model, ratio, family):
    """Per row and layer: text tokens + per image the count its stage says (independent of the engine).

    Separators (LLaVA-NeXT's newline tokens) are outside the budget: an image keeps
    `stage_count(content)` tokens once pruned, and all its tokens (separators included) until then.
    """
    visual = inputs["input_ids"] == model.config.image_token_id
    valid = inputs["attention_mask"].bool()
    n_layers = len(language_model(model).layers)
    counts, content = image_counts(family, model, inputs)
    rows = image_rows(visual, counts)
    assert pruner.budgets[-1] == tokprune.core.budget.Budget(ratio=ratio)  # the user's, at the last stage
    bounds, stages = stage_plan(pruner, content, n_layers)  # a composite method is installed as its stages
    expected = []
    for row in range(visual.shape[0]):
        text = int((valid[row] & ~visual[row]).sum())
        mine = [i for i, r in enumerate(rows) if r == row]
        per_stage = [
            text + sum(kept[i] if kept[i] < content[i] else counts[i] for i in mine) for kept in stages
        ]
        layer = []
        for i in range(n_layers):
            passed = [s for s, b in enumerate(bounds) if i >= b]
            layer.append(per_stage[passed[-1]] if passed else text + sum(counts[i] for i in mine))
        expected.append(layer)
    assert pruner.stats.layer_tokens == expected
    return expected


class LayerLengthProbe:
    """Records the sequence length every decoder layer processes (register after apply)."""

    def __init__(self, model):
        self.lengths = []
        self.handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(language_model(model).layers)
        ]

    def _hook(self, i):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self.lengths.append((i, hidden.shape[1]))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# images per batch row: one and two images; a text-only row beside an image row
LAYOUTS = {"1+2": (1, 2), "0+1": (0, 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_pruned_equals_masked_reference(tiny, family, attn, method, layout):
    """Prefill (every real position) and every decode step equal the masked reference; the LLM input is the
    unpatched one at the kept positions; token counts exact; remove() restores prefill and generate()."""
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    inputs = batch_inputs(family, proc, LAYOUTS[layout])
    unpatched = unpatched_outputs(family, attn, layout, inputs)
    ratio = 0.25
    pruner = tokprune.apply(model, method, keep_ratio=ratio, **TINY_OPTIONS.get(method, {}))
    probe = LayerLengthProbe(model)

    def counts(stats) -> None:
        expected = _expected_layer_tokens(pruner, inputs, model, ratio, family)
        padded = [max(r[i] for r in expected) for i in range(len(expected[0]))]
        assert [length for _, length in probe.lengths] == padded
        probe.remove()
        assert stats.visual_kept == [int(k.numel()) for k in stats.kept]
        assert all(torch.equal(k, k.sort().values) for k in stats.kept)

    try:
        prefill, generated = run_pruned(model, inputs, pruner, counts)
    finally:
        probe.remove()
    assert_matches_reference(model, inputs, prefill, generated)
    assert not inputs["attention_mask"].bool().all(1).all()  # the batch really has a left-padded row
    assert_restored(model, inputs, unpatched)


def run_pruned(model, inputs: dict, pruner, after_prefill=None) -> tuple[tuple, tuple]:
    """A prefill (at the positions generate() uses, so that absolute RoPE angles match) and a generate()
    under `pruner`, recorded for `assert_matches_reference`: (prefill, generated). after_prefill(stats)
    runs its checks between the two; the pruner is removed at the end."""
    recorder, streams = LMInputRecorder(model), StageInputRecorder(model, pruner)
    try:
        with torch.no_grad():
            logits = model(**inputs, position_ids=original_positions(model, inputs)).logits
        prefill = (logits, pruner.stats, recorder.embeds, streams.hidden)
        if after_prefill is not None:
            after_prefill(pruner.stats)
        recorder.embeds, streams.hidden = None, {}
        tokens, steps = _generate(model, inputs)  # a new prefill: its stats describe it
        generated = (tokens, steps, pruner.stats, recorder.embeds, streams.hidden)
    finally:
        recorder.remove()
        streams.remove()
        pruner.remove()
    return prefill, generated


def assert_matches_reference(
    model,
    inputs: dict,
    prefill: tuple,
    generated: tuple,
    tol: float = TOL,
    positions: str = "original",
    renumbered: frozenset[int] = frozenset(),
) -> None:
    """A pruned prefill and a pruned generate() equal the masked reference of what each pruned.

    prefill: (logits (B, L', V) of a forward given the original positions, its stats, its LLM input, its
    boundary streams {b: (B, L_b, D)}); generated: (tokens (B, n), per-step logits [(B, V)] * n, and the
    stats, LLM input and boundary streams of generate()'s prefill). The reference computes every state
    itself, taking from the pruned run only what a stage rewrote (`StageStats.merged`), and checks the LLM
    input bit for bit; every real position of the prefill is compared.
    """
    logits, stats, lm_input, hidden = prefill
    perm, layout = llm_order(model, inputs, stats), []
    none = inputs["input_ids"][:, :0]
    reference = reference_logits(
        model, inputs, stats, lm_input, none, hidden, perm, positions, renumbered, layout
    )
    assert_prefill_matches(logits, reference[0], present_after(model, inputs, stats, layout[0]), tol)
    tokens, steps, stats, lm_input, hidden = generated
    # generate's first logits come from the prefill; step t >= 1 follows t generated tokens
    new = tokens[:, : len(steps) - 1]
    perm = llm_order(model, inputs, stats)
    reference = reference_logits(model, inputs, stats, lm_input, new, hidden, perm, positions, renumbered)
    assert_steps_match(steps, reference, tol)


# (method, family) pairs the reproduction mode covers: the families of each method's released code that use
# 1-D positions; it refuses the M-RoPE ones (Qwen), whose positions keep their original rows
MROPE = {a.family for a in ADAPTERS if a.position_rows is not Adapter.position_rows}
CODE_PAIRS = [(m, f) for m in METHODS for f in FAMILIES if f in REGISTRY[m].code_families]
REPRODUCIBLE = [(m, f) for m, f in CODE_PAIRS if f not in MROPE]
REPRODUCE = dict(order="selection", positions="contiguous")


def renumbering_boundaries(pruner, n_layers: int) -> frozenset[int]:
    """Boundaries of the installed in-LLM stages whose authors' code renumbers the sequence."""
    return frozenset(
        b
        for m in pruner.methods
        if isinstance(m, LLMMethod) and m.code_positions == "contiguous"
        for b in m.boundaries(n_layers)
    )


@pytest.mark.parametrize(("method", "family"), [(m, f) for m, f in CODE_PAIRS if f in MROPE])
def test_reproduction_mode_refuses_mrope(tiny, method, family):
    model, _ = tiny(family)
    with pytest.raises(ReproductionError, match="M-RoPE"):
        tokprune.apply(model, method, keep_ratio=0.25, **REPRODUCE)
    assert not hasattr(model, "_tokprune_pruner")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize(("method", "family"), REPRODUCIBLE)
def test_reproduction_mode_equals_masked_reference(tiny, family, attn, method, layout):
    """apply(order="selection", positions="contiguous"): prefill and every decode step equal the masked
    reference run on the prompt laid out in the order the LLM received it, numbered contiguously over the
    tokens the pre-LLM stage left; remove() restores."""
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    inputs = batch_inputs(family, proc, LAYOUTS[layout])
    unpatched = unpatched_outputs(family, attn, layout, inputs)
    pruner = tokprune.apply(model, method, keep_ratio=0.25, **REPRODUCE, **TINY_OPTIONS.get(method, {}))
    renumbered = renumbering_boundaries(pruner, len(language_model(model).layers))
    prefill, generated = run_pruned(model, inputs, pruner)
    assert_matches_reference(model, inputs, prefill, generated, positions="contiguous", renumbered=renumbered)
    assert_restored(model, inputs, unpatched)


def _special_ids(model) -> list[int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [i for i in (getattr(model.config, n, None) for n in names) if i is not None]


# a pre-LLM method, then two in-LLM methods one after the other; each with its own options
COMPOSITION = ["divprune", ("fastv", {"layer": 1}), ("dart", {"layer": 3, "quota": "exact"})]


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_composition_equals_masked_reference(tiny, family, attn):
    """Three stages from three methods: each counts its budget on the tokens it receives; prefill and
    every decode step equal the masked reference; stats report every stage; remove() restores."""
    model, proc = tiny(family, attn)
    inputs = batch_inputs(family, proc, LAYOUTS["1+2"])
    pruner = tokprune.apply(model, COMPOSITION, keep_ratio=0.5)
    recorder, streams = LMInputRecorder(model), StageInputRecorder(model, pruner)
    try:
        tokens, steps = _generate(model, inputs)
        stats, embeds = pruner.stats, recorder.embeds
    finally:
        recorder.remove()
        streams.remove()
        pruner.remove()
    assert [(s.method, s.where) for s in stats.stages] == [
        ("divprune", "pre"), ("fastv", "llm@1"), ("dart", "llm@3")
    ]  # fmt: skip
    _, content = image_counts(family, model, inputs)
    pre_kept = [int(round(0.098 * n)) for n in content]  # divprune's default: the code's rounding
    fastv_kept = [math.ceil(0.5 * n - 1e-9) for n in pre_kept]  # fastv's default, on what it receives
    dart_kept = [math.ceil(0.5 * n - 1e-9) for n in fastv_kept]  # the user's keep_ratio, last method
    for stage, per_image in zip(stats.stages, (pre_kept, fastv_kept, dart_kept)):
        assert sorted(int(k.numel()) for k in stage.kept) == sorted([per_image[0], sum(per_image[1:])])
    reference = reference_logits(model, inputs, stats, embeds, tokens[:, : len(steps) - 1], streams.hidden)
    assert_steps_match(steps, reference, TOL)
    assert_restored(model, inputs, unpatched_outputs(family, attn, "1+2", inputs))
