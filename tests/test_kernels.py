"""The Triton score kernels against the chunked PyTorch reference (DESIGN §5).

On a machine without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, which
conftest.py sets before anything imports Triton); on a GPU machine they run compiled on CUDA tensors. Tolerances: fp32 inputs
relative error <= 1e-3 (measured ~1e-7: the kernels multiply in IEEE fp32); bf16 inputs <= 1e-3 against
the reference on the same bf16 values, and <= 2e-2 against the fp32 inputs they were rounded from
(bf16's 8-bit mantissa, not the kernel, sets that bound).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")

import tokprune  # noqa: E402
from tokprune import kernels  # noqa: E402
from tokprune.kernels import scores  # noqa: E402
from tokprune.signals import attention  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
FP32_TOL = 1e-3
BF16_TOL = 2e-2
# interpreted kernels are slow: small tiles keep several tiles per segment at test sizes
BLOCK = 64 if CUDA else 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("sizes", [[70], [30, 40], [1, 17, 16, 33], [5] * 6])
@pytest.mark.parametrize("dim", [16, 20])
def test_received_attention_matches_reference(sizes, dim):
    torch.manual_seed(len(sizes) + dim)
    n = sum(sizes)
    q, k = torch.randn(2, 3, n, dim, device=DEVICE) * 2  # peaked softmax rows
    got = scores.received_attention(q, k, dim**-0.5, sizes, block=BLOCK)
    want = attention.received_attention(q, k, dim**-0.5, sizes, backend="torch")
    assert _rel(got, want) <= FP32_TOL
    # every block's column means sum to 1 (each query row is a distribution over its own block)
    assert torch.allclose(
        torch.stack([b.sum() for b in got.split(sizes)]), torch.ones(len(sizes), device=DEVICE)
    )


@pytest.mark.parametrize("rows", [1, 5, 20])
@pytest.mark.parametrize("groups", [1, 2])
def test_attention_rows_match_reference_with_gqa_limits_and_padding(rows, groups):
    torch.manual_seed(rows * groups)
    batch, kv_heads, n, dim = 2, 2, 45, 24
    q = torch.randn(batch, kv_heads * groups, rows, dim, device=DEVICE)
    k = torch.randn(batch, kv_heads, n, dim, device=DEVICE)
    key_mask = torch.ones(batch, n, dtype=torch.bool, device=DEVICE)
    key_mask[1, :7] = False  # a left-padded row
    limit = torch.randint(10, n, (batch, rows), device=DEVICE)
    got = scores.attention_rows(q, k, 0.2, limit, key_mask, block=BLOCK)
    want = attention.attention_rows(q, k, 0.2, limit, key_mask, backend="torch")
    assert _rel(got, want) <= FP32_TOL
    assert torch.allclose(got.sum(-1), torch.ones(batch, rows, device=DEVICE), atol=1e-5)
    assert not got[1, :, :7].any()  # padding gets nothing
    positions = torch.arange(n, device=DEVICE)
    assert not (got * (positions > limit[..., None])).any()  # nothing after a query's own position


def test_a_query_that_sees_no_key_gets_zeros_on_both_paths():
    q, k = torch.randn(1, 2, 3, 16, device=DEVICE), torch.randn(1, 2, 20, 16, device=DEVICE)
    key_mask = torch.zeros(1, 20, dtype=torch.bool, device=DEVICE)
    key_mask[0, 10:] = True
    limit = torch.tensor([[5, 12, 19]], device=DEVICE)  # query 0 sees only padding
    for backend in ("triton", "torch"):
        out = attention.attention_rows(q, k, 0.25, limit, key_mask, backend=backend)
        assert not out[0, 0].any() and torch.allclose(out[0, 1:].sum(-1), torch.ones(2, device=DEVICE))


def test_signal_functions_dispatch_to_the_kernels():
    torch.manual_seed(3)
    q, k = torch.randn(2, 4, 1, 16, device=DEVICE), torch.randn(2, 4, 30, 16, device=DEVICE)
    mask = torch.rand(2, 30, device=DEVICE) > 0.3
    for fn, args in (
        (attention.cls_attention, (q, k, 0.25)),
        (attention.last_query_attention, (q, k[:, :2], 0.25, mask)),
    ):
        assert _rel(fn(*args, backend="triton"), fn(*args, backend="torch")) <= FP32_TOL
    with pytest.raises(ValueError, match="unknown kernel backend"):
        attention.cls_attention(q, k, 0.25, backend="cuda")


def test_bf16_inputs_within_the_documented_tolerance():
    torch.manual_seed(4)
    q, k = torch.randn(2, 4, 64, 32, device=DEVICE)
    qb, kb = q.bfloat16(), k.bfloat16()
    got = scores.received_attention(qb, kb, 32**-0.5, [24, 40], block=BLOCK)
    same_inputs = attention.received_attention(qb, kb, 32**-0.5, [24, 40], backend="torch")
    assert _rel(got, same_inputs) <= FP32_TOL
    assert _rel(got, attention.received_attention(q, k, 32**-0.5, [24, 40], backend="torch")) <= BF16_TOL


def test_torch_path_streams_in_bounded_chunks():
    """The reference never forms N x N: a chunk's fp32 logits stay under CHUNK_BYTES for any N."""
    for heads, n in ((16, 1024), (16, 32768), (32, 131072)):
        rows = attention.rows_per_chunk(heads, n)
        assert 8 * heads * rows * n <= max(attention.CHUNK_BYTES, 8 * heads * n) and rows < n
    assert attention.rows_per_chunk(4, 100, chunk=7) == 7


def test_auto_backend_uses_kernels_only_on_cuda():
    cpu = torch.zeros(1)
    assert not kernels.use_triton("auto", cpu) and not kernels.use_triton("torch", cpu)
    assert kernels.use_triton("triton", cpu) == kernels.interpreting()


@pytest.mark.parametrize("method", ["visionzip", "fastv", "sparsevlm", "hiprune"])
def test_whole_model_scores_agree_under_the_kernels(tiny, method):
    """A model's kept sets are the same whether its signals come from the kernels or from PyTorch."""
    from tiny_models import batch_inputs

    model, proc = tiny("llava")
    inputs = batch_inputs("llava", proc, (1, 2))
    kept = {}
    for backend in ("torch", "triton"):
        with kernels.default_backend(backend), tokprune.apply(model, method, keep_ratio=0.25) as pruner:
            with torch.no_grad():
                model(**inputs)
            kept[backend] = pruner.stats.kept
    assert all(torch.equal(a, b) for a, b in zip(kept["torch"], kept["triton"]))
