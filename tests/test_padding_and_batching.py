"""Neither the padding side nor the batch-mates change what is pruned (every method x family, from the
registry and BUILDERS).

* A right-padded batch keeps the same tokens as the left-padded one and gives the same logits at every
  row's last real token. Pruned rows are re-packed with left padding, so that token is the last position
  of the output; in-LLM scores query each row's last *real* token, not the last position.
* A row run alone keeps the same tokens and gives the same last-token logits as in the batch.
* Whatever numbering the caller gives a left-padded row (a plain `model(**batch)` numbers it from its padding
  offset on most families, generate() from its first real token), it keeps the same tokens and gives the same
  logits as alone (issue 24: anything that reads post-RoPE keys or absolute positions, e.g. DART's key-norm
  pivots, is taken as the authors' code sees a row, numbered from its first real token).
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


def _pruned_run(model, method: str, inputs: dict, positions: bool = True):
    """(last-position logits (B, V), stats) of a keep_ratio 0.25 prefill at generate()'s positions (or, with
    positions=False, at the ones the model's forward gives when called without position_ids)."""
    options = TINY_OPTIONS.get(method, {})
    given = {"position_ids": original_positions(model, inputs)} if positions else {}
    with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner, torch.no_grad():
        logits = model(**inputs, **given).logits
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


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", tokprune.available_methods())
def test_a_padded_row_prunes_alike_with_and_without_position_ids(tiny, family, method):
    """Each row of a left-padded batch, called without position_ids (the forward's own numbering) and with
    generate()'s, keeps the tokens and gives the logits of that row alone."""
    model, proc = tiny(family, "sdpa")
    skip_without_tiles(model, method)
    batch = _padded(family, proc, "left")
    assert not batch["attention_mask"][:, 0].all()  # one row really starts with padding
    runs = [_pruned_run(model, method, batch, positions) for positions in (False, True)]
    for row in (0, 1):
        alone_logits, alone = _pruned_run(model, method, _padded(family, proc, "left", rows=(row,)))
        for logits, stats in runs:
            assert torch.equal(stats.kept[row], alone.kept[0]), (row, method)
            _close(logits[row], alone_logits[0])
