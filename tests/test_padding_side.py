"""The padding side does not change what is pruned: a right-padded batch keeps the same tokens as the
left-padded one and gives the same logits at every row's last real token. Pruned rows are re-packed with
left padding, so that token is the last position of the output. Every method x family (registry and
BUILDERS); in-LLM scores query each row's last *real* token, not the last position."""

import pytest
import torch
from reference import original_positions
from test_invariants import TINY_OPTIONS, TOL
from tiny_models import BUILDERS, batch_images, process, prompt_text
from tokprune.patches import adapter_for

import tokprune
from tokprune.methods import REGISTRY

WORDS = ("describe the image please", "w1 w2 w3 w4 w5 w6 w7 w8 describe the image")


def _padded(family: str, proc, side: str) -> dict:
    texts = [prompt_text(family, n, WORDS[row]) for row, n in enumerate((1, 2))]
    return process(family, proc, texts, batch_images(family, (1, 2)), padding=True, padding_side=side)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", tokprune.available_methods())
def test_right_padding_prunes_like_left_padding(tiny, family, method):
    model, proc = tiny(family, "sdpa")
    if REGISTRY[method].needs_tiles and not adapter_for(model).tiles:
        pytest.skip("needs AnyRes tiles (refusal tested in test_invariants)")
    left, right = _padded(family, proc, "left"), _padded(family, proc, "right")
    assert not right["attention_mask"][:, -1].all()  # one row really ends in padding
    runs = []
    for inputs in (left, right):
        options = TINY_OPTIONS.get(method, {})
        positions = original_positions(model, inputs)  # generate()'s: absolute RoPE angles match
        with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner, torch.no_grad():
            logits = model(**inputs, position_ids=positions).logits
        assert logits.shape[1] < inputs["input_ids"].shape[1]  # pruned, hence re-packed
        runs.append((logits[:, -1], pruner.stats))
    (a, left_stats), (b, right_stats) = runs
    assert left_stats.visual_kept == right_stats.visual_kept
    assert all(torch.equal(x, y) for x, y in zip(left_stats.kept, right_stats.kept))
    assert left_stats.layer_tokens == right_stats.layer_tokens
    torch.testing.assert_close(b, a, atol=TOL * max(1.0, float(a.abs().max())), rtol=0)
