"""`labels=` on a pruned forward (every method x family, from the registry and BUILDERS): the loss is the
model's own loss over the kept tokens (each logit predicts the next kept token's label); keep-all and
text-only forwards give the unpatched loss bit for bit."""

import pytest
import torch
import torch.nn.functional as F
from checks import skip_without_tiles
from reference import visual_mask
from test_invariants import TINY_OPTIONS
from tiny_models import BUILDERS, batch_inputs, text_inputs

import tokprune
from tokprune.core.labels import IGNORE
from tokprune.errors import UnsupportedInputError


def _labels(inputs: dict) -> torch.Tensor:
    """Every real token is a target, image placeholders included (so kept visual labels count too)."""
    return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE)


def _kept_labels(model, inputs: dict, labels: torch.Tensor, kept: list[torch.Tensor]) -> torch.Tensor:
    """The labels of the tokens a pruned forward keeps, left-padded with -100: built from stats.kept
    (visual ranks per row) and the prompt alone, independently of the engine's bookkeeping."""
    visual = visual_mask(model, inputs["input_ids"])
    valid = inputs["attention_mask"].bool()
    rows = []
    for row in range(labels.shape[0]):
        rank = visual[row].long().cumsum(0) - 1
        kept_visual = torch.zeros_like(visual[row])
        kept_visual[visual[row]] = torch.isin(rank[visual[row]], kept[row])
        keep = valid[row] & (~visual[row] | kept_visual)
        rows.append(labels[row][keep])
    width = max(r.numel() for r in rows)
    return torch.stack([F.pad(r, (width - r.numel(), 0), value=IGNORE) for r in rows])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", tokprune.available_methods())
def test_loss_over_the_kept_tokens(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    inputs = batch_inputs(family, proc, (1, 2))
    labels = _labels(inputs)
    with torch.no_grad():
        unpatched = model(**inputs, labels=labels).loss
    options = TINY_OPTIONS.get(method, {})
    with torch.no_grad(), tokprune.apply(model, method, keep_ratio=1.0, **options):
        assert torch.equal(model(**inputs, labels=labels).loss, unpatched)
    with torch.no_grad(), tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner:
        out = model(**inputs, labels=labels)
    kept = _kept_labels(model, inputs, labels, pruner.stats.kept)
    assert kept.shape == out.logits.shape[:2]
    expected = F.cross_entropy(
        out.logits[:, :-1].flatten(0, 1).float(), kept[:, 1:].flatten(), ignore_index=IGNORE
    )
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(out.loss, unpatched)


def test_text_only_loss_and_tuples(tiny):
    model, proc = tiny("llava", "sdpa")
    text = text_inputs(proc)
    inputs = batch_inputs("llava", proc, (1, 2))
    with torch.no_grad():
        text_loss = model(**text, labels=text["input_ids"]).loss
        tuple_loss = model(**inputs, labels=_labels(inputs), return_dict=False)[0]
    with torch.no_grad(), tokprune.apply(model, "divprune", keep_ratio=0.25):
        assert torch.equal(model(**text, labels=text["input_ids"]).loss, text_loss)
        out = model(**inputs, labels=_labels(inputs), return_dict=False)
        dict_out = model(**inputs, labels=_labels(inputs))
    assert torch.equal(out[0], dict_out.loss) and torch.equal(out[1], dict_out.logits)
    assert not torch.equal(out[0], tuple_loss)


def test_shift_labels_are_refused_once_the_sequence_is_pruned(tiny):
    model, proc = tiny("llava", "sdpa")
    inputs = batch_inputs("llava", proc, (1, 2))
    labels = _labels(inputs)
    refused = pytest.raises(UnsupportedInputError, match="shift_labels")
    with torch.no_grad(), tokprune.apply(model, "divprune", keep_ratio=0.25), refused:
        model(**inputs, labels=labels, shift_labels=labels)
