"""DESIGN §8 invariants for every registered method x model x attention backend.

A new method or model joins this matrix automatically (methods from the registry, models from
tiny_models.BUILDERS).
"""

import math

import pytest
import torch
from reference import (
    LMInputRecorder,
    StageInputRecorder,
    language_model,
    original_positions,
    reference_logits,
    stage_plan,
)
from tiny_models import BUILDERS, batch_inputs, image_counts
from tokprune.patches import adapter_for

import tokprune
from tokprune.core.layout import image_rows
from tokprune.errors import UnsupportedModelError
from tokprune.methods import REGISTRY

METHODS = tokprune.available_methods()
FAMILIES = list(BUILDERS)
BACKENDS = ["sdpa", "eager"]
NEW_TOKENS = 3
# options a method needs on the tiny models (2-3 layer vision towers); defaults everywhere else
TINY_OPTIONS = {"vtc_cls": {"start_layer": -2, "end_layer": -1}}
TOL = 1e-5  # relative to the largest |logit| of the compared tensors (float32 summation-order noise)


def _refuses_without_tiles(model, method) -> bool:
    """AnyRes-only methods (`needs_tiles`) on a model without tiles: apply() must refuse them early,
    naming the models that have tiles, and install nothing. True when that was the case checked."""
    if not REGISTRY[method].needs_tiles or adapter_for(model).tiles:
        return False
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(UnsupportedModelError, match="models with tiles: .*ForConditionalGeneration"):
        tokprune.apply(model, method, keep_ratio=0.25, **TINY_OPTIONS.get(method, {}))
    assert not hasattr(model, "_tokprune_pruner")
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    return True


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
    if _refuses_without_tiles(model, method):
        return
    assert_keep_all_identical(model, batch_inputs(family, proc, (1, 2)), method)


def assert_keep_all_identical(model, inputs: dict, method: str) -> None:
    """keep_ratio=1.0 gives bit-identical prefill logits, generated tokens and per-step logits."""
    ref_logits = _prefill(model, inputs)
    ref_tokens, ref_steps = _generate(model, inputs)
    with tokprune.apply(model, method, keep_ratio=1.0, **TINY_OPTIONS.get(method, {})):
        assert torch.equal(_prefill(model, inputs), ref_logits)
        tokens, steps = _generate(model, inputs)
    assert torch.equal(tokens, ref_tokens)
    for a, b in zip(steps, ref_steps):
        assert torch.equal(a, b)


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
    """Prefill and every decode step equal the masked reference; token counts exact; remove() restores."""
    model, proc = tiny(family, attn)
    if _refuses_without_tiles(model, method):
        return
    inputs = batch_inputs(family, proc, LAYOUTS[layout])
    ref_logits = _prefill(model, inputs)
    ratio = 0.25
    pruner = tokprune.apply(model, method, keep_ratio=ratio, **TINY_OPTIONS.get(method, {}))
    recorder, probe = LMInputRecorder(model), LayerLengthProbe(model)
    streams = StageInputRecorder(model, pruner)
    try:
        with torch.no_grad():  # the positions generate() would use, so that absolute RoPE angles match
            pruned_prefill = model(**inputs, position_ids=original_positions(model, inputs)).logits
        prefill_stats, prefill_embeds = pruner.stats, recorder.embeds
        expected = _expected_layer_tokens(pruner, inputs, model, ratio, family)
        padded = [max(r[i] for r in expected) for i in range(len(expected[0]))]
        assert [length for _, length in probe.lengths] == padded
        probe.remove()
        assert prefill_stats.visual_kept == [int(k.numel()) for k in prefill_stats.kept]
        assert all(torch.equal(k, k.sort().values) for k in prefill_stats.kept)
        prefill_hidden, streams.hidden = streams.hidden, {}
        recorder.embeds = None
        tokens, steps = _generate(model, inputs)  # a new prefill: its stats describe it
        generate_stats, generate_embeds = pruner.stats, recorder.embeds
    finally:
        recorder.remove()
        streams.remove()
        probe.remove()
        pruner.remove()
    reference = reference_logits(
        model, inputs, prefill_stats, _pre(prefill_stats, prefill_embeds), tokens[:, :0], prefill_hidden
    )
    # the text tail (after the images) is aligned from the right in the pruned and the full sequence
    tail = 4
    torch.testing.assert_close(
        pruned_prefill[:, -tail:], reference[0][:, -tail:], atol=TOL * _scale(reference), rtol=0
    )
    reference = reference_logits(
        model, inputs, generate_stats, _pre(generate_stats, generate_embeds), tokens, streams.hidden
    )
    # generate's first logits come from the prefill; step t >= 1 follows t generated tokens
    torch.testing.assert_close(steps[0], reference[0][:, -1], atol=TOL * _scale(reference), rtol=0)
    for step in range(1, len(steps)):
        torch.testing.assert_close(steps[step], reference[step], atol=TOL * _scale(reference), rtol=0)
    assert not inputs["attention_mask"].bool().all(1).all()  # the batch really has a left-padded row
    # remove() restores bit-identical outputs
    assert torch.equal(_prefill(model, inputs), ref_logits)


def _pre(stats, embeds):
    """The LLM input of a pruned run, if a pre-LLM stage changed it."""
    return embeds if stats.stages and stats.stages[0].where == "pre" else None


def _scale(reference) -> float:
    return max(1.0, float(reference[0].abs().max()))


def _special_ids(model) -> list[int]:
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [i for i in (getattr(model.config, n, None) for n in names) if i is not None]


# a pre-LLM method, then two in-LLM methods one after the other; each with its own options
COMPOSITION = ["divprune", ("fastv", {"layer": 1}), ("dart", {"layer": 3})]


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_composition_equals_masked_reference(tiny, family, attn):
    """Three stages from three methods: each counts its budget on the tokens it receives; prefill and
    every decode step equal the masked reference; stats report every stage; remove() restores."""
    model, proc = tiny(family, attn)
    inputs = batch_inputs(family, proc, (1, 2))
    ref_logits = _prefill(model, inputs)
    pruner = tokprune.apply(model, COMPOSITION, keep_ratio=0.5)
    recorder = LMInputRecorder(model)
    try:
        tokens, steps = _generate(model, inputs)
        stats, embeds = pruner.stats, recorder.embeds
    finally:
        recorder.remove()
        pruner.remove()
    assert [(s.method, s.where) for s in stats.stages] == [
        ("divprune", "pre"), ("fastv", "llm@1"), ("dart", "llm@3")
    ]  # fmt: skip
    _, content = image_counts(family, model, inputs)
    pre_kept = [math.ceil(0.098 * n - 1e-9) for n in content]  # divprune's default keep_ratio
    fastv_kept = [math.ceil(0.5 * n - 1e-9) for n in pre_kept]  # fastv's default, on what it receives
    dart_kept = [math.ceil(0.5 * n - 1e-9) for n in fastv_kept]  # the user's keep_ratio, last method
    for stage, per_image in zip(stats.stages, (pre_kept, fastv_kept, dart_kept)):
        assert sorted(int(k.numel()) for k in stage.kept) == sorted([per_image[0], sum(per_image[1:])])
    reference = reference_logits(model, inputs, stats, embeds, tokens)
    torch.testing.assert_close(steps[0], reference[0][:, -1], atol=TOL * _scale(reference), rtol=0)
    for step in range(1, len(steps)):
        torch.testing.assert_close(steps[step], reference[step], atol=TOL * _scale(reference), rtol=0)
    assert torch.equal(_prefill(model, inputs), ref_logits)
