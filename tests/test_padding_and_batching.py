"""Neither the padding side nor the batch-mates change what is pruned (every method x family, from the
registry and BUILDERS).

* A right-padded batch keeps the same tokens as the left-padded one and gives the same logits at every
  row's last real token. Pruned rows are re-packed with left padding, so that token is the last position
  of the output; in-LLM scores query each row's last *real* token, not the last position.
* A row run alone keeps the same tokens and gives the same last-token logits as in the batch.
"""

import pytest
import torch
from checks import skip_without_tiles
from reference import original_positions
from test_invariants import TINY_OPTIONS, TOL
from tiny_models import BUILDERS, batch_images, process, prompt_text

import tokprune

WORDS = ("describe the image please", "w1 w2 w3 w4 w5 w6 w7 w8 describe the image")


def _padded(family: str, proc, side: str, rows=(0, 1)) -> dict:
    """Rows of the 2-row batch (one image, then two), padded on `side`."""
    texts = [prompt_text(family, n, WORDS[row]) for row, n in enumerate((1, 2))]
    images = batch_images(family, (1, 2))
    return process(
        family, proc, [texts[r] for r in rows], [images[r] for r in rows], padding=True, padding_side=side
    )


def _pruned_run(model, method: str, inputs: dict):
    """(last-position logits (B, V), stats) of a keep_ratio 0.25 prefill at generate()'s positions."""
    positions = original_positions(model, inputs)  # absolute RoPE angles match across paddings
    options = TINY_OPTIONS.get(method, {})
    with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner, torch.no_grad():
        logits = model(**inputs, position_ids=positions).logits
    assert logits.shape[1] < inputs["input_ids"].shape[1]  # pruned, hence re-packed
    return logits[:, -1], pruner.stats


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=TOL * max(1.0, float(expected.abs().max())), rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", tokprune.available_methods())
def test_right_padding_prunes_like_left_padding(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    left, right = _padded(family, proc, "left"), _padded(family, proc, "right")
    assert not right["attention_mask"][:, -1].all()  # one row really ends in padding
    (a, left_stats), (b, right_stats) = _pruned_run(model, method, left), _pruned_run(model, method, right)
    assert left_stats.visual_kept == right_stats.visual_kept
    assert all(torch.equal(x, y) for x, y in zip(left_stats.kept, right_stats.kept))
    assert left_stats.layer_tokens == right_stats.layer_tokens
    _close(b, a)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", tokprune.available_methods())
def test_a_row_alone_prunes_like_in_the_batch(tiny, family, method, attn):
    model, proc = tiny(family, attn)
    skip_without_tiles(model, method)
    batch_logits, batch_stats = _pruned_run(model, method, _padded(family, proc, "left"))
    for row in (0, 1):
        logits, stats = _pruned_run(model, method, _padded(family, proc, "left", rows=(row,)))
        assert torch.equal(stats.kept[0], batch_stats.kept[row])
        assert stats.layer_tokens[0] == batch_stats.layer_tokens[row]
        _close(logits[0], batch_logits[row])
