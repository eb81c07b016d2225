"""The Triton score kernels against the chunked PyTorch reference (DESIGN §5).

Device-aware: on a machine without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1,
which conftest.py sets before anything imports Triton); on a GPU machine (benchmarks/gpu_checks.sh) every
tensor and the tiny model live on CUDA and the kernels run compiled, bf16 inputs through the tensor-core
`tl.dot` branch the interpreter never takes. Tolerances: fp32 inputs relative error <= 1e-3 (measured
~1e-7: the kernels multiply in IEEE fp32); bf16 inputs <= 1e-3 against the reference on the same bf16
values (bf16 products are exact in fp32, only the summation order differs), and <= 2e-2 against the fp32
inputs they were rounded from (bf16's 8-bit mantissa, not the kernel, sets that bound).
"""

import pytest
import torch

CUDA = torch.cuda.is_available()
triton = pytest.importorskip("triton")

import tokprune  # noqa: E402
from tokprune import kernels  # noqa: E402
from tokprune.errors import UnsupportedInputError  # noqa: E402
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
    if kernels.interpreting():  # the CPU test runs: kernels may be forced on CPU tensors
        assert kernels.use_triton("triton", cpu)
    else:
        with pytest.raises(ValueError, match="need CUDA tensors"):
            kernels.use_triton("triton", cpu)
    if CUDA:
        cuda = torch.zeros(1, device="cuda")
        assert kernels.use_triton("auto", cuda) and kernels.use_triton("triton", cuda)
        assert not kernels.use_triton("torch", cuda)


_LLAVA: dict = {}


def _llava_on_device():
    """The tiny LLaVA on the test device (a model of its own: the shared fixture's stays on the CPU)."""
    if not _LLAVA:
        from tiny_models import BUILDERS

        model, proc = BUILDERS["llava"]("sdpa")
        _LLAVA["model"], _LLAVA["proc"] = model.to(DEVICE), proc
    return _LLAVA["model"], _LLAVA["proc"]


@pytest.mark.parametrize("method", ["visionzip", "fastv", "sparsevlm", "hiprune"])
def test_whole_model_scores_agree_under_the_kernels(method):
    """A model's kept sets are the same whether its signals come from the kernels or from PyTorch (on the
    test device: compiled kernels on a GPU, the interpreter on the CPU)."""
    from tiny_models import batch_inputs

    model, proc = _llava_on_device()
    inputs = {k: v.to(DEVICE) for k, v in batch_inputs("llava", proc, (1, 2)).items()}
    kept = {}
    for backend in ("torch", "triton"):
        with kernels.default_backend(backend), tokprune.apply(model, method, keep_ratio=0.25) as pruner:
            with torch.no_grad():
                model(**inputs)
            kept[backend] = pruner.stats.kept
    assert all(torch.equal(a, b) for a, b in zip(kept["torch"], kept["triton"]))


# ------------------------------------------------------------------- input checks and dtypes
def test_received_attention_refuses_keys_without_the_query_heads():
    q, k = torch.randn(4, 20, 16, device=DEVICE), torch.randn(2, 20, 16, device=DEVICE)
    with pytest.raises(UnsupportedInputError, match="one shape"):
        scores.received_attention(q, k, 0.25, block=BLOCK)
    with pytest.raises(UnsupportedInputError, match="one shape"):
        scores.received_attention(q, k[:, :, :8].repeat(2, 1, 1), 0.25, block=BLOCK)  # head size differs
    with pytest.raises(UnsupportedInputError, match="sum to the sequence"):
        scores.received_attention(q, q, 0.25, [10, 5], block=BLOCK)
    with pytest.raises(UnsupportedInputError, match=">= 0"):
        scores.received_attention(q, q, 0.25, [25, -5], block=BLOCK)


@pytest.mark.parametrize(
    "keys_shape, limit_shape, mask_shape, match",
    [
        ((2, 3, 30, 16), None, None, "multiple of the key heads"),  # 4 query heads over 3 key heads
        ((1, 2, 30, 16), None, None, "same batch"),
        ((2, 2, 30, 8), None, None, "head size"),
        ((2, 30, 16), None, None, r"\(B, H_kv, N, d\)"),
        ((2, 2, 30, 16), (2, 3), None, "limit must have shape"),
        ((2, 2, 30, 16), None, (2, 29), "key_mask must have shape"),
    ],
)
def test_attention_rows_refuse_shapes_that_do_not_fit(keys_shape, limit_shape, mask_shape, match):
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    k = torch.randn(*keys_shape, device=DEVICE)
    limit = torch.zeros(limit_shape, dtype=torch.long, device=DEVICE) if limit_shape else None
    mask = torch.ones(mask_shape, dtype=torch.bool, device=DEVICE) if mask_shape else None
    with pytest.raises(UnsupportedInputError, match=match):
        scores.attention_rows(q, k, 0.25, limit, mask, block=BLOCK)


def test_keys_of_another_dtype_are_cast_to_the_querys():
    """The query's dtype chooses the product; keys in another dtype are cast to it first (as if the
    caller had): bf16 query + fp32 keys = both bf16, fp32 query + bf16 keys = both fp32."""
    torch.manual_seed(5)
    q, k = torch.randn(2, 4, 48, 16, device=DEVICE) * 2  # peaked rows: bf16 rounding of the keys shows
    sizes = [20, 28]
    for query, keys in ((q.bfloat16(), k), (q, k.bfloat16())):
        cast = keys.to(query.dtype)
        want = attention.received_attention(query, cast, 0.25, sizes, backend="torch")
        assert _rel(scores.received_attention(query, keys, 0.25, sizes, block=BLOCK), want) <= FP32_TOL
        want_rows = attention.attention_rows(query[None, :, :3], cast[None], 0.25, backend="torch")
        assert (
            _rel(scores.attention_rows(query[None, :, :3], keys[None], 0.25, block=BLOCK), want_rows)
            <= FP32_TOL
        )
    # the check can fail: fp32 keys left as they are give another answer than the bf16 ones
    uncast = attention.received_attention(q.bfloat16(), k, 0.25, sizes, backend="torch")
    assert (
        _rel(uncast, attention.received_attention(q.bfloat16(), k.bfloat16(), 0.25, sizes, backend="torch"))
        > FP32_TOL
    )


@pytest.mark.skipif(not CUDA, reason="needs a GPU (4.5 GiB of bf16 inputs)")
def test_offsets_past_two_to_the_31_elements():
    """A key tensor whose last head starts past 2^31 elements (a strided view over 4.5 GiB of bf16): int32
    offsets would wrap there; the kernels address it in int64 and match the reference."""
    heads, n, dim = 9, 256, 128
    head_stride = 2**28  # head 8 starts at element 2^31
    storage = torch.randn(heads * head_stride, dtype=torch.bfloat16, device="cuda")
    keys = storage.as_strided((heads, n, dim), (head_stride, dim, 1))
    query = torch.randn(heads, n, dim, dtype=torch.bfloat16, device="cuda")
    got = scores.received_attention(query, keys, dim**-0.5, [128, 128])
    want = attention.received_attention(query, keys.contiguous(), dim**-0.5, [128, 128], backend="torch")
    assert _rel(got, want) <= BF16_TOL
    rows = scores.attention_rows(query[None, :, :2], keys[None], dim**-0.5)
    want_rows = attention.attention_rows(
        query[None, :, :2], keys.contiguous()[None], dim**-0.5, backend="torch"
    )
    assert _rel(rows, want_rows) <= BF16_TOL
    del storage, keys


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (a model split across devices)")
def test_kernels_launch_on_their_inputs_device():
    q, k = torch.randn(2, 3, 40, 16, device="cuda:1")
    with torch.cuda.device(0):
        got = scores.received_attention(q, k, 0.25, [15, 25])
    assert got.device == q.device
    assert _rel(got, attention.received_attention(q, k, 0.25, [15, 25], backend="torch")) <= FP32_TOL
