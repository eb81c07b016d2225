"""Ragged pruned batches through flash attention: the bookkeeping, and transformers' flash_attention_2
path on pruned batches of every method and every model family transformers runs under it.

Rows that keep different numbers of tokens are left-padded; tokprune hands every decoder layer a 2-D
padding mask, from which transformers' flash path packs the real tokens (cu_seqlens) and calls the
variable-length kernel. A batch of one row without padding (its all-ones mask is dropped) runs the dense
kernel: tokprune gives the layers no position ids under flash attention, which transformers would read as
packed sequences when they have gaps (`tokprune.core.positions.layer_position_ids`). Checked here: pruned
runs under flash_attention_2 give the logits of the same pruned runs under sdpa (prefill and every decode
step; ragged batches, and one row in a first turn and in a follow-up turn on a reused cache), and each
layer's kernel call computes exactly the real tokens of the batch (none of the padding).

Runs (`RUNS`): without flash-attn, on the CPU with the PyTorch stand-in, in fp32 (exact, with the
stand-in's explicit `allow_fp32` opt-in: flash-attn itself refuses fp32) and in bf16; where flash-attn is
installed, on CUDA in bf16 with flash-attn's own kernel (benchmarks/gpu_checks.sh). Tolerances, relative
to the largest |logit|: fp32 1e-5 (summation order; the one-row runs measured 0 exactly); bf16
`BF16_TOL` = 0.08, twice the largest difference measured on the CPU (2026-12, stand-in): pruned bf16 flash
against pruned bf16 sdpa, every step, over the methods below and every family, 0.039 (the unpruned models
differ by up to 0.030), from bf16 rounding in different places of the two kernels. The one-row
follow-up defect gave 0.24-2.1 in bf16 (0.13-2.1 in fp32). bf16 runs use methods whose kept sets cannot
depend on the attention backend (pre-LLM methods, FastV scoring at layer 1 from layer 0's input):
elsewhere bf16 noise before the boundary may flip near-tied scores, and the two runs would keep
different tokens. On a GPU the bf16 bound is the CPU's, not yet measured there.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import test_multiturn as tm
import torch
import torch.nn.functional as F
from checks import assert_same_run
from flash_reference import (
    real_flash_attention,
    reference_flash_attention,
    supports_flash_attention_2,
    use_flash_attention_2,
)
from test_invariants import METHODS, TINY_OPTIONS, _generate, _refuses_without_tiles
from tiny_models import BUILDERS, batch_inputs
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input

import tokprune
from tokprune.core.compat import CACHE_KWARG, output_cache
from tokprune.errors import UnsupportedInputError
from tokprune.kernels import varlen

README = Path(__file__).parent.parent / "README.md"
FP32_TOL = 1e-5
BF16_TOL = 0.08
FLASH_FAMILIES = [f for f in BUILDERS if supports_flash_attention_2(BUILDERS[f]("sdpa")[0])]
FASTV_AT_1 = ("fastv", {"layer": 1})  # scores from layer 0's input: the same under every backend
BF16_METHODS = [("divprune", {}), ("visionzip", {}), FASTV_AT_1]
ONE_ROW_METHODS = {
    torch.float32: [("divprune", {}), ("fastv", {})],
    torch.bfloat16: [("divprune", {}), FASTV_AT_1],
}


@dataclass(frozen=True)
class Run:
    """Where and in which dtype the flash and sdpa models run, and the logits tolerance."""

    device: str
    dtype: torch.dtype
    tol: float

    def __str__(self) -> str:
        return f"{self.device}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def allow_fp32(self) -> bool:  # the stand-in's opt-in (never on the real kernel)
        return self.dtype == torch.float32

    def inputs(self, inputs: dict) -> dict:
        return {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()
        }


if real_flash_attention():
    RUNS = [Run("cuda", torch.bfloat16, BF16_TOL)]
else:
    RUNS = [Run("cpu", torch.float32, FP32_TOL), Run("cpu", torch.bfloat16, BF16_TOL)]
_MODELS: dict = {}


def _flash_model(family: str, run: Run = RUNS[0]):
    """(model with flash_attention_2 in its LLM, the same model with sdpa, processor) on the run's device
    and dtype: equal weights."""
    key = (family, str(run))
    if key not in _MODELS:
        flash, proc = BUILDERS[family]("sdpa")
        use_flash_attention_2(flash)
        sdpa = BUILDERS[family]("sdpa")[0]
        _MODELS[key] = (flash.to(run.device, run.dtype), sdpa.to(run.device, run.dtype), proc)
    return _MODELS[key]


def _matrix() -> list:
    """(run, family, method, options): every method in fp32, the backend-independent ones in bf16."""
    params = []
    for run in RUNS:
        methods = [(m, TINY_OPTIONS.get(m, {})) for m in METHODS] if run.allow_fp32 else BF16_METHODS
        # bf16 on the sparse-MoE model: a decode step of divprune's pruned batch measured 0.095 of the
        # largest logit between the two backends (2026-12-07; the prefill 0.019), over BF16_TOL: bf16
        # noise before a near-tied router choice sends a token to another expert. fp32 covers the family.
        for family in [f for f in FLASH_FAMILIES if run.allow_fp32 or f != "qwen3_vl_moe"]:
            for method, options in methods:
                name = f"{run}-{family}-{method}{'@1' if options.get('layer') == 1 else ''}"
                params.append(pytest.param(run, family, method, options, id=name))
    return params


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
    packed = varlen.flash_attn_varlen_func(pq, pk, pv, cu, cu, longest, longest, causal=True, allow_fp32=True)
    out = varlen.pad(packed, idx, batch, length)
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
    q, k, v = torch.randn(3, 2, 5, 4, 8).bfloat16()
    dense = varlen.flash_attn_func(q, k, v, causal=True)
    for row in range(2):
        cu = torch.tensor([0, 5], dtype=torch.int32)
        one = varlen.flash_attn_varlen_func(q[row], k[row], v[row], cu, cu, 5, 5, causal=True)
        torch.testing.assert_close(dense[row], one, atol=0, rtol=0)


def test_the_stand_in_refuses_what_flash_attn_refuses():
    q, k, v = torch.randn(3, 6, 4, 16)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(UnsupportedInputError, match="fp16 and bf16 inputs only.*allow_fp32"):
        varlen.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6)
    with pytest.raises(UnsupportedInputError, match="fp16 and bf16"):
        varlen.flash_attn_func(q[None], k[None], v[None])
    b = q.bfloat16()
    refused = {
        "share a dtype": (b, k.half(), v.bfloat16(), cu),
        "head sizes up to 256": (*torch.zeros(3, 6, 4, 320, dtype=torch.bfloat16), cu),
        "multiple of the key/value heads": (b, b[:, :3], b[:, :3], cu),
        "contiguous last dimension": (b.transpose(0, 2).contiguous().transpose(0, 2), b, b, cu),
        "int32": (b, b, b, cu.long()),
    }
    for match, (qq, kk, vv, cc) in refused.items():
        with pytest.raises(UnsupportedInputError, match=match):
            varlen.flash_attn_varlen_func(qq, kk, vv, cc, cc, 6, 6)
    assert varlen.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, allow_fp32=True).dtype == torch.float32


@pytest.mark.skipif(real_flash_attention(), reason="the CPU stand-in's refusal (flash-attn raises its own)")
def test_an_fp32_model_under_flash_attention_2_is_refused_as_flash_attn_would():
    flash, _, proc = _flash_model("llava", Run("cpu", torch.float32, FP32_TOL))
    with reference_flash_attention(), torch.no_grad(), pytest.raises(UnsupportedInputError, match="bfloat16"):
        flash(**batch_inputs("llava", proc, (1,)))


def test_gemma3_is_not_run_under_flash_attention_2():
    """transformers 5.24 refuses Gemma 3 under flash_attention_2 (it would drop the bidirectional image
    blocks); the tests do not force it, and the README's model table claims flash only where it runs."""
    gemma, _ = BUILDERS["gemma3"]("sdpa")
    assert "gemma3" not in FLASH_FAMILIES and not supports_flash_attention_2(gemma)
    with pytest.raises(ValueError, match="does not support Flash Attention"):
        gemma.set_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="does not run Gemma3ForConditionalGeneration"):
        use_flash_attention_2(gemma)
    rows = [line for line in README.read_text().splitlines() if line.startswith("| `")]
    for family in BUILDERS:
        name = type(BUILDERS[family]("sdpa")[0]).__name__
        row = next(line for line in rows if line.startswith(f"| `{name}`"))
        assert ("flash_attention_2" in row) == (family in FLASH_FAMILIES), name


# ------------------------------------------------------- transformers' flash path, pruned runs
def _forced(model, inputs: dict, words: torch.Tensor, cache=None) -> tuple[list, object, torch.Tensor]:
    """A prefill of `inputs` (on `cache`), then one decode step per token of `words` (1, n), by plain
    model() calls: [(B, V)] last-position logits of each forward, the cache, the final 2-D mask."""
    out = model(**inputs, use_cache=True, **({CACHE_KWARG: cache} if cache is not None else {}))
    logits, mask = [out.logits[:, -1].float()], inputs["attention_mask"]
    for step in range(words.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=words[:, step : step + 1], attention_mask=mask, **{CACHE_KWARG: output_cache(out)}
        )
        logits.append(out.logits[:, -1].float())
    return logits, output_cache(out), mask


@pytest.mark.parametrize("run, family, method, options", _matrix())
def test_pruned_flash_attention_2_equals_pruned_sdpa(run, family, method, options):
    """Every method x family: the flash_attention_2 run of a pruned ragged batch gives the sdpa run's
    prefill logits and decode steps, and each LLM layer's kernel computes only the real tokens."""
    flash, sdpa, proc = _flash_model(family, run)
    if _refuses_without_tiles(sdpa, method):
        return
    inputs = run.inputs(batch_inputs(family, proc, (1, 2)))
    options = dict(keep_ratio=0.25, **options)
    with tokprune.apply(sdpa, method, **options) as pruner, torch.no_grad():
        expected = sdpa(**inputs).logits[:, -1].float()
        expected_kept = pruner.stats.kept
        tokens, steps = _generate(sdpa, inputs)
        if not run.allow_fp32:  # bf16: both runs are fed the same tokens, whatever their own argmax
            steps = _forced(sdpa, inputs, tokens[:, :-1])[0]
    with (
        reference_flash_attention(run.allow_fp32) as calls,
        tokprune.apply(flash, method, **options) as pruner,
    ):
        with torch.no_grad():
            prefill = flash(**inputs).logits[:, -1]
        stats = pruner.stats
        prefill_calls, calls[:] = list(calls), []
        if run.allow_fp32:
            flash_tokens, flash_steps = _generate(flash, inputs)
        else:
            flash_tokens, flash_steps = tokens, _forced(flash, inputs, tokens[:, :-1])[0]
    assert all(torch.equal(a, b) for a, b in zip(stats.kept, expected_kept))
    assert_same_run((prefill.float(), flash_tokens, flash_steps), (expected, tokens, steps), run.tol)
    # prefill: one kernel call per LLM layer, over exactly the real tokens that layer sees
    per_layer = [sum(row[i] for row in stats.layer_tokens) for i in range(len(stats.layer_tokens[0]))]
    assert [n for _, n in prefill_calls] == per_layer
    ragged = len({row[-1] for row in stats.layer_tokens}) > 1
    assert not ragged or prefill_calls[-1][0] == "varlen"  # rows of different lengths: packed tokens


def _one_row_params() -> list:
    return [
        pytest.param(run, family, method, options, id=f"{run}-{family}-{method}{'@1' if options else ''}")
        for run in RUNS
        for family in FLASH_FAMILIES
        for method, options in ONE_ROW_METHODS[run.dtype]
    ]


class _Forced(LogitsProcessor):
    """Makes generate() emit `words` (n,) in order, so that runs on two backends continue alike."""

    def __init__(self, words: torch.Tensor) -> None:
        self.words, self.step = words, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.words[self.step]] = 0.0
        self.step += 1
        return forced


def _generate_forced(model, words: torch.Tensor, **inputs):
    """generate() emitting `words` (n,): its raw logits per step (output_logits) are compared."""
    return model.generate(
        **inputs, max_new_tokens=words.numel(), do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0, logits_processor=LogitsProcessorList([_Forced(words)]),
    )  # fmt: skip


def _one_row_talk(model, proc, family: str, method: str, options: dict, run: Run) -> tuple[list, list]:
    """One row, no padding, through generate() (which passes Qwen-VL its text position row): turn 1 with
    one image, then a follow-up turn with a new image on the reused cache (the tests/test_multiturn.py
    protocol), each emitting the same forced tokens whatever the backend. Returns the logits of every step
    (the first of each turn: its prefill) and the stats of both turns."""
    words = proc.tokenizer(" w1 w2", add_special_tokens=False)["input_ids"]
    words = torch.tensor(words, device=run.device)
    first = run.inputs(batch_inputs(family, proc, (1,)))
    assert first["attention_mask"].all()
    with tokprune.apply(model, method, keep_ratio=0.25, **options) as pruner, torch.no_grad():
        out = _generate_forced(model, words, **first)
        stats, logits = [pruner.stats], list(out.logits)
        new = run.inputs(tm._follow_up(family, proc, 1))
        ids = torch.cat([words[None, -1:], new["input_ids"]], dim=1)  # the last token is not in the cache yet
        mask = torch.cat(
            [first["attention_mask"], torch.ones_like(words[None]), new["attention_mask"]], dim=1
        )
        turn = {**new, "input_ids": ids, "attention_mask": mask, **tm._token_types(model, ids)}
        out = _generate_forced(model, words, **turn, past_key_values=output_cache(out))
        stats.append(pruner.stats)
    return [x.float() for x in logits + list(out.logits)], stats


@pytest.mark.parametrize("run, family, method, options", _one_row_params())
def test_one_row_first_and_follow_up_turns_under_flash_attention_2(run, family, method, options):
    """A batch of one row carries gapped (original) position ids after pruning, and no padding mask (all
    ones: transformers drops it). In the first turn and in a follow-up turn on the reused cache (where
    the new tokens attend to the cache and themselves) flash gives the sdpa run's logits; every kernel
    call is the dense one over the row's real tokens (no packed-sequence reading of the positions)."""
    flash, sdpa, proc = _flash_model(family, run)
    expected, expected_kept = _one_row_talk(sdpa, proc, family, method, options, run)
    with reference_flash_attention(run.allow_fp32) as calls:
        got, kept = _one_row_talk(flash, proc, family, method, options, run)
    assert calls and all(kind == "dense" for kind, _ in calls)
    assert all(s.visual_kept < s.visual_in for s in kept)  # both turns pruned: gapped positions
    assert all(torch.equal(a.kept[0], b.kept[0]) for a, b in zip(kept, expected_kept))
    scale = max(1.0, float(expected[0].abs().max()))
    for step, (a, b) in enumerate(zip(got, expected)):
        torch.testing.assert_close(a, b, atol=run.tol * scale, rtol=0, msg=f"forward {step}")


@pytest.mark.skipif(real_flash_attention(), reason="the defect shown with the CPU stand-in, fp32")
def test_the_follow_up_defect_without_tokpruns_layer_positions(monkeypatch):
    """What the position-id rule prevents: given the gapped ids, transformers packs a one-row follow-up
    turn as sequences with the keys' lengths equal to the queries' (cu_seqlens_k = cu_seqlens_q), and the
    new tokens attend to the first cache slots. Shown by switching the rule off."""
    from tokprune.core import stages

    run = Run("cpu", torch.float32, FP32_TOL)
    flash, sdpa, proc = _flash_model("llava", run)
    options = {}
    expected, _ = _one_row_talk(sdpa, proc, "llava", "divprune", options, run)
    monkeypatch.setattr(stages, "layer_position_ids", lambda position_ids, config: position_ids)
    with reference_flash_attention(allow_fp32=True) as calls:
        got, _ = _one_row_talk(flash, proc, "llava", "divprune", options, run)
    assert any(kind == "varlen" for kind, _ in calls)
    assert float((got[2] - expected[2]).abs().max()) > 0.1  # the follow-up's prefill is wrong
