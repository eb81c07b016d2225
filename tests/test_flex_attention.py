"""Pruned batches through transformers' flex_attention backend (torch's FlexAttention).

tokprune hands every decoder layer the mask transformers' own mask builders make for the layer's cache
(`create_causal_mask` and friends), so under flex_attention a layer gets a BlockMask over its pruned
cache, built from the same 2-D padding mask and (Gemma 3) the same bidirectional image blocks. Checked:
keep-all and remove() are bit-identical to the unpatched flex model; a pruned ragged, left-padded batch
gives the logits of the same pruned batch under sdpa (which the invariant tests check against the masked
reference), in prefill and every decode step, keeps the same tokens, and every LLM layer's kernel runs on
the pruned length.

The tiny models run on the CPU, where the kernel runs uncompiled: torch 2.13's inductor cannot compile
transformers' flex kernels here (a C++ compile error, `cur_kvSplitSize0` not declared, with or without
tokprune), so the fixture hands transformers torch's own uncompiled `flex_attention` for CPU tensors.
Everything transformers does around the kernel (the BlockMask of each layer's cache, the padding and
image-block mask functions) runs for real. Slow: the block masks are still compiled, per shape.
"""

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
from checks import assert_same_run
from test_invariants import COMPOSITION, _generate
from tiny_models import BUILDERS, batch_inputs
from tiny_onevision import onevision_batch
from torch.nn.attention.flex_attention import flex_attention

import tokprune

pytestmark = pytest.mark.slow

TOL = 1e-5  # relative to the largest |logit|: the two kernels sum in different orders
FAMILIES = list(BUILDERS)
METHODS = ["divprune", "visionzip", "fastv", "pdrop", "sparsevlm", COMPOSITION]
_MODELS: dict = {}


@pytest.fixture(autouse=True)
def flex_calls(monkeypatch) -> list:
    """The query lengths of every flex_attention kernel call on CPU tensors (which run uncompiled)."""
    calls: list[int] = []
    compiled = hf_flex.compile_friendly_flex_attention

    def kernel(query, key, value, training=False, **kwargs):
        if query.device.type != "cpu":
            return compiled(query, key, value, training=training, **kwargs)
        calls.append(int(query.shape[-2]))
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", kernel)
    return calls


def _flex(family: str):
    """The tiny model of `family` under flex_attention: the whole model where transformers supports it,
    else its language model; None where transformers supports it for neither."""
    for request in ("flex_attention", {"text_config": "flex_attention"}):
        model, _ = BUILDERS[family]("sdpa")
        try:
            model.set_attn_implementation(request)
        except (
            ValueError
        ):  # "... does not support an attention implementation through torch's flex_attention"
            continue
        return model
    return None


def _models(family: str):
    """(model under flex_attention, the same weights under sdpa, processor)."""
    if family not in _MODELS:
        sdpa, proc = BUILDERS[family]("sdpa")
        _MODELS[family] = (_flex(family), sdpa, proc)
    flex, sdpa, proc = _MODELS[family]
    if flex is None:
        pytest.skip(f"transformers 5.24 runs {family}'s language model without flex_attention")
    return flex, sdpa, proc


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_and_remove_under_flex_attention_are_bit_identical(family, flex_calls):
    flex, _, proc = _models(family)
    inputs = batch_inputs(family, proc, (1, 2))
    with torch.no_grad():
        expected = flex(**inputs).logits
        tokens, steps = _generate(flex, inputs)
        with tokprune.apply(flex, "random", keep_ratio=1.0):
            assert torch.equal(flex(**inputs).logits, expected)
            got_tokens, got_steps = _generate(flex, inputs)
    assert torch.equal(got_tokens, tokens)
    assert all(torch.equal(a, b) for a, b in zip(got_steps, steps))
    assert flex_calls  # the kernel ran
    with torch.no_grad():
        with tokprune.apply(flex, "divprune", keep_ratio=0.25):
            flex(**inputs)
        assert torch.equal(flex(**inputs).logits, expected)  # removing the pruner restores the model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m if isinstance(m, str) else "composition")
def test_pruned_flex_attention_equals_pruned_sdpa(family, method, flex_calls):
    flex, sdpa, proc = _models(family)
    _assert_flex_equals_sdpa(flex, sdpa, batch_inputs(family, proc, (1, 2)), method, flex_calls)


@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_pruned_images_and_videos_under_flex_attention(method, flex_calls):
    """LLaVA-OneVision rows holding an image and a video clip in different orders."""
    flex, sdpa, proc = _models("llava_onevision")
    _assert_flex_equals_sdpa(flex, sdpa, onevision_batch(proc, "mixed"), method, flex_calls)


def _assert_flex_equals_sdpa(flex, sdpa, inputs: dict, method, flex_calls: list) -> None:
    assert not inputs["attention_mask"].all()  # rows of different lengths: left padding
    options = dict(keep_ratio=0.25)
    with tokprune.apply(sdpa, method, **options) as pruner, torch.no_grad():
        expected = sdpa(**inputs).logits[:, -1]
        kept = pruner.stats.kept
        tokens, steps = _generate(sdpa, inputs)
    with tokprune.apply(flex, method, **options) as pruner, torch.no_grad():
        flex_calls.clear()
        prefill = flex(**inputs).logits[:, -1]
        layers = len(pruner.stats.layer_tokens[0])
        # every LLM layer ran the kernel, on the batch's longest pruned row
        assert flex_calls[-layers:] == [
            max(row[i] for row in pruner.stats.layer_tokens) for i in range(layers)
        ]
        assert all(torch.equal(a, b) for a, b in zip(pruner.stats.kept, kept))
        flex_tokens, flex_steps = _generate(flex, inputs)
    assert_same_run((prefill, flex_tokens, flex_steps), (expected, tokens, steps), TOL)
