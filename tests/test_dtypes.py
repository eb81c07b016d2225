"""Every method on every family in bfloat16, the dtype real checkpoints run in on a GPU.

tokprune computes its scores in float32 from the model's own (half-precision) projections and writes only
the model's dtype back into it. Checked here: keep-all is bit-identical to the unpatched bfloat16 model;
a pruned ragged batch keeps the budgeted number of tokens per image, keeps the logits in bfloat16 and
finite, and generates.
"""

import pytest
import torch
from test_invariants import METHODS, TINY_OPTIONS, _refuses_without_tiles
from tiny_models import BUILDERS, batch_inputs

import tokprune

_MODELS: dict = {}


def _bfloat16(family: str):
    """(the tiny model of `family` in bfloat16, its processor)."""
    if family not in _MODELS:
        model, proc = BUILDERS[family]("sdpa")
        _MODELS[family] = (model.to(torch.bfloat16), proc)
    return _MODELS[family]


def _inputs(family: str, proc) -> dict:
    inputs = batch_inputs(family, proc, (1, 2))
    return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_in_bfloat16(family, method):
    model, proc = _bfloat16(family)
    if _refuses_without_tiles(model, method):
        return
    inputs = _inputs(family, proc)
    options = TINY_OPTIONS.get(method, {})
    with torch.no_grad():
        expected = model(**inputs).logits
        with tokprune.apply(model, method, keep_ratio=1.0, **options):
            assert torch.equal(model(**inputs).logits, expected)
        with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner:
            logits = model(**inputs).logits[:, -1]
            stats = pruner.stats
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert stats.visual_kept == [int(k.numel()) for k in stats.kept]
    assert all(kept < seen for kept, seen in zip(stats.visual_kept, stats.visual_in))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
