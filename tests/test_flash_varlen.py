"""Ragged pruned batches through flash attention: the bookkeeping, and transformers' flash_attention_2
path on pruned batches of every method and model family (on a CPU, with the reference kernel).

Rows that keep different numbers of tokens are left-padded; tokprune hands every decoder layer a 2-D
padding mask, from which transformers' flash path packs the real tokens (cu_seqlens) and calls the
variable-length kernel. Checked here: pruned runs under flash_attention_2 give the logits of the same
pruned runs under sdpa (prefill and every decode step), and each layer's kernel call computes exactly
the real tokens of the batch (none of the padding).
"""

import pytest
import torch
import torch.nn.functional as F
from checks import assert_same_run
from flash_reference import reference_flash_attention, use_flash_attention_2
from test_invariants import METHODS, TINY_OPTIONS, _generate, _refuses_without_tiles
from tiny_models import BUILDERS, batch_inputs
from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

import tokprune
from tokprune.kernels import varlen

TOL = 1e-5  # relative to the largest |logit|: float32 summation order differs between the two kernels
_MODELS: dict = {}


def _flash_model(family: str):
    """(model with flash_attention_2 in its LLM, the same model with sdpa, processor): equal weights."""
    if family not in _MODELS:
        flash, proc = BUILDERS[family]("sdpa")
        use_flash_attention_2(flash)
        _MODELS[family] = (flash, BUILDERS[family]("sdpa")[0], proc)
    return _MODELS[family]


def _inputs(family: str, proc) -> dict:
    inputs = batch_inputs(family, proc, (1, 2))
    # flash attention has no bidirectional blocks: transformers runs Gemma 3 causally under it, so the
    # sdpa run it is compared with gets the causal masks too (no token_type_ids)
    inputs.pop("token_type_ids", None)
    return inputs


# ------------------------------------------------------------------------------- bookkeeping
def test_unpad_and_pad_follow_flash_attns_contract():
    x = torch.randn(3, 5, 2, 4)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    packed, indices, cu, longest, lengths = varlen.unpad(x, mask)
    assert cu.tolist() == [0, 3, 8, 9] and cu.dtype == torch.int32 and longest == 5
    assert lengths.tolist() == [3, 5, 1]
    assert torch.equal(packed, x[mask.bool()])  # row-major real tokens
    back = varlen.pad(packed, indices, 3, 5)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and not back[~mask.bool()].any()
    # transformers' own helpers agree exactly (they are what runs where flash-attn is installed)
    hf = _unpad_input(x, mask)
    assert all(torch.equal(a, b) for a, b in zip((packed, indices, cu), hf[:3])) and hf[3] == longest
    assert torch.equal(_pad_input(packed, indices, 3, 5), back)


def test_varlen_attention_equals_masked_sdpa_on_a_left_padded_batch():
    torch.manual_seed(0)
    batch, length, heads, kv_heads, dim = 3, 9, 4, 2, 8
    q = torch.randn(batch, length, heads, dim)
    k, v = torch.randn(2, batch, length, kv_heads, dim)
    lengths = torch.tensor([9, 4, 6])
    mask = torch.arange(length) >= (length - lengths)[:, None]  # left padding
    pq, idx, cu, longest, _ = varlen.unpad(q, mask)
    pk, _, _, _, _ = varlen.unpad(k, mask)
    pv, _, _, _, _ = varlen.unpad(v, mask)
    out = varlen.pad(
        varlen.flash_attn_varlen_func(pq, pk, pv, cu, cu, longest, longest, causal=True), idx, batch, length
    )
    allowed = mask[:, None, None, :] & torch.ones(length, length, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, enable_gqa=True
    ).transpose(1, 2)
    torch.testing.assert_close(out[mask], expected[mask], atol=1e-6, rtol=0)


def test_causal_alignment_and_window_are_flash_attns():
    # a decode step's single query sits at the end of the keys and sees all of them
    assert varlen.visible_keys(1, 6, True, (-1, -1), "cpu").all()
    # with as many queries as keys, causal is the lower triangle
    assert torch.equal(
        varlen.visible_keys(4, 4, True, (-1, -1), "cpu"), torch.ones(4, 4, dtype=torch.bool).tril()
    )
    # window (2, 2) with causal: the current key and the two before it
    window = varlen.visible_keys(5, 5, True, (2, 2), "cpu")
    assert window.sum(1).tolist() == [1, 2, 3, 3, 3] and window[4, 2:].all()


def test_dense_entry_point_is_the_varlen_one_on_full_rows():
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 2, 5, 4, 8)
    dense = varlen.flash_attn_func(q, k, v, causal=True)
    for row in range(2):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        one = varlen.flash_attn_varlen_func(q[row], k[row], v[row], cu, cu, 5, 5, causal=True)
        torch.testing.assert_close(dense[row], one, atol=1e-6, rtol=0)


# ------------------------------------------------------- transformers' flash path, pruned runs
@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("method", METHODS)
def test_pruned_flash_attention_2_equals_pruned_sdpa(family, method):
    """Every method x family: the flash_attention_2 run of a pruned ragged batch gives the sdpa run's
    prefill logits and decode steps, and each LLM layer's kernel computes only the real tokens."""
    flash, sdpa, proc = _flash_model(family)
    if _refuses_without_tiles(sdpa, method):
        return
    inputs = _inputs(family, proc)
    options = dict(keep_ratio=0.25, **TINY_OPTIONS.get(method, {}))
    with tokprune.apply(sdpa, method, **options), torch.no_grad():
        expected = sdpa(**inputs).logits[:, -1]
        tokens, steps = _generate(sdpa, inputs)
    with reference_flash_attention() as calls, tokprune.apply(flash, method, **options) as pruner:
        with torch.no_grad():
            prefill = flash(**inputs).logits[:, -1]
        stats = pruner.stats
        prefill_calls, calls[:] = list(calls), []
        flash_tokens, flash_steps = _generate(flash, inputs)
    assert_same_run((prefill, flash_tokens, flash_steps), (expected, tokens, steps), TOL)
    # prefill: one kernel call per LLM layer, over exactly the real tokens that layer sees
    per_layer = [sum(row[i] for row in stats.layer_tokens) for i in range(len(stats.layer_tokens[0]))]
    assert [n for _, n in prefill_calls] == per_layer
    ragged = len({row[-1] for row in stats.layer_tokens}) > 1
    assert not ragged or prefill_calls[-1][0] == "varlen"  # rows of different lengths: packed tokens


def test_a_single_pruned_row_with_gapped_positions_is_one_sequence():
    """Batch of one, no padding: transformers sees gapped (original) position ids and takes the packed
    path; the whole row must still be one sequence (it is: only the smallest position starts one)."""
    flash, sdpa, proc = _flash_model("llava")
    inputs = batch_inputs("llava", proc, (2,))
    assert inputs["attention_mask"].all()
    with tokprune.apply(sdpa, "divprune", keep_ratio=0.25), torch.no_grad():
        expected = sdpa(**inputs).logits
    with (
        reference_flash_attention() as calls,
        tokprune.apply(flash, "divprune", keep_ratio=0.25),
        torch.no_grad(),
    ):
        got = flash(**inputs).logits
    assert calls and all(kind == "varlen" for kind, _ in calls)
    torch.testing.assert_close(got, expected, atol=TOL * max(1.0, float(expected.abs().max())), rtol=0)
