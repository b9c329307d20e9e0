"""Every Triton kernel against its q-op's reference, on fresh random inputs and awkward sizes.

Without a GPU these run in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small; on a CUDA device the same tests run the compiled kernels. Errors are measured
against float64 math on the same quantized operands.
"""

import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

from qcompiler.ir import int4, ops  # noqa: E402
from qcompiler.runtimes import triton_quantize, triton_support, triton_w8a8, triton_weight_only  # noqa: E402
from qcompiler.runtimes import triton_tuning  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
QDTYPES = [torch.int8, ops.FP8]
# M = 1 (decode), 33 (past a 16/32-row tile); K and N off every block size; K = 20000 > the
# one-tile limit of the quantize kernel (its two-pass path); K = 576 is SmolLM2's hidden size
MKN = [(1, 40, 24), (33, 100, 70), (5, 576, 17)]

def bits(t):
    return t.view(torch.uint8) if t.dtype == ops.FP8 else t

def fresh(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)

# ----------------------------------------------------------------------------- activation quantize

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 33), (3, 5, 40), (2, 20000)])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_per_token_is_bit_identical_to_the_reference(qdtype, dtype, shape, smooth):
    x = fresh(*shape, dtype=dtype, scale=3.0)
    smooth_inv = torch.rand(shape[-1], device=DEVICE) + 0.5 if smooth else None
    q, scale = triton_quantize.quantize_per_token(x, smooth_inv, qdtype)
    q_ref, scale_ref = ops.quantize_per_token_ref(x, smooth_inv, qdtype)
    assert q.dtype == qdtype and q.shape == x.shape and scale.shape == scale_ref.shape
    assert torch.equal(scale, scale_ref)
    assert torch.equal(bits(q), bits(q_ref))

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_tensor_saturates_like_the_reference(qdtype, dtype):
    x = fresh(4, 3, 70, dtype=dtype, scale=5.0)
    scale = torch.tensor(0.02, device=DEVICE)  # values up to ~20/0.02 = 1000: far past both ranges
    smooth_inv = torch.rand(70, device=DEVICE) + 0.5
    q = triton_quantize.quantize_per_tensor(x, scale, smooth_inv, qdtype)
    q_ref = ops.quantize_per_tensor_ref(x, scale, smooth_inv, qdtype)
    assert torch.equal(bits(q), bits(q_ref))
    assert (q.float().abs() == ops.QMAXES[qdtype]).any()  # the test reached saturation

def test_fp8_rounding_of_every_e4m3_value_and_every_tie():
    # all finite E4M3 values, the midpoints between neighbours (ties: round to even) and points
    # just off them: the kernel's own rounding must match torch's cast everywhere
    grid = torch.arange(256, dtype=torch.uint8).view(ops.FP8).float()
    grid = grid[torch.isfinite(grid)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    x = torch.cat([grid, mids, mids * (1 + 2**-20), mids * (1 - 2**-20)]).to(DEVICE)
    q = triton_quantize.quantize_per_tensor(x[None], torch.tensor(1.0, device=DEVICE), None, ops.FP8)
    assert torch.equal(bits(q[0]), bits(x.to(ops.FP8)))

def test_int8_rounds_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 127.49, 300.0]], device=DEVICE)
    q = triton_quantize.quantize_per_tensor(x, torch.tensor(1.0, device=DEVICE))
    assert q.tolist() == [[0, 2, 2, 0, -2, 126, -128, 127, 127]]

def test_smooth_factor_shape_is_checked():
    with pytest.raises(ValueError, match="one factor per input feature"):
        triton_quantize.quantize_per_token(fresh(2, 8), torch.ones(7, device=DEVICE))

# ----------------------------------------------------------------------------- W8A8 GEMM

def f64_w8a8(xq, xs, wq, ws, bias):
    return ops.linear_w8a8_ref(xq, xs.double(), wq, ws.double(), None if bias is None else bias.double(),
                               torch.float64)

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", MKN)
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_w8a8_gemm_matches_float64(qdtype, out_dtype, m, k, n, per_token, with_bias):
    x, w = fresh(2, m, k, scale=3.0), fresh(n, k)
    if per_token:
        xq, xs = ops.quantize_per_token_ref(x, None, qdtype)
    else:
        xs = torch.tensor(0.05, device=DEVICE)
        xq = ops.quantize_per_tensor_ref(x, xs, None, qdtype)
    wq, ws = ops.quantize_per_channel_ref(w, qdtype)
    bias = fresh(n) if with_bias else None
    y = triton_w8a8.linear_w8a8(xq, xs, wq, ws, bias, out_dtype)
    truth = f64_w8a8(xq, xs, wq, ws, bias)
    ref = ops.linear_w8a8_ref(xq, xs, wq, ws, bias, out_dtype)
    assert y.dtype == out_dtype and y.shape == (2, m, n)
    # the 8-bit product is exact (int32 / float32 accumulation of exact products); the float32
    # epilogue adds ~1e-7, and a 16-bit output one rounding, as the float64 reference's does
    assert rel_err(y, truth) <= 1.05 * rel_err(ref, truth) + 2e-7

@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 40, 24), (5, 576, 17), (16, 100, 70)])
@pytest.mark.parametrize("per_token", [True, False])
def test_w8a8_gemv_configs_match_float64(qdtype, m, k, n, per_token):
    x, w = fresh(m, k, scale=3.0), fresh(n, k)
    xq, xs = (ops.quantize_per_token_ref(x, None, qdtype) if per_token else
              (ops.quantize_per_tensor_ref(x, torch.tensor(0.05, device=DEVICE), None, qdtype),
               torch.tensor(0.05, device=DEVICE)))
    wq, ws = ops.quantize_per_channel_ref(w, qdtype)
    bias = fresh(n)
    y = triton_w8a8.linear_w8a8_triton(xq, xs, wq, ws, bias, torch.bfloat16, path="gemv")
    truth = f64_w8a8(xq, xs, wq, ws, bias)
    ref = ops.linear_w8a8_ref(xq, xs, wq, ws, bias, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_err(y, truth) <= 1.05 * rel_err(ref, truth) + 2e-7
    with pytest.raises(ValueError, match="'gemv' takes M <= 16"):
        triton_w8a8.linear_w8a8_triton(xq.repeat(17, 1)[:17], xs.repeat(17, 1)[:17] if per_token else xs, wq, ws,
                                       bias, torch.bfloat16, path="gemv")

def test_w8a8_rejects_mixed_operands_and_wrong_scales():
    xq, xs = ops.quantize_per_token_ref(fresh(3, 16))
    wq, ws = ops.quantize_per_channel_ref(fresh(8, 16), ops.FP8)
    with pytest.raises(ValueError, match="two int8 or two float8"):
        triton_w8a8.linear_w8a8(xq, xs, wq, ws, None, torch.float32)
    wq, ws = ops.quantize_per_channel_ref(fresh(8, 16))
    with pytest.raises(ValueError, match="per output channel"):
        triton_w8a8.linear_w8a8(xq, xs, wq, ws[:4], None, torch.float32)
    with pytest.raises(ValueError, match=r"does not match weight"):
        triton_w8a8.linear_w8a8(xq[:, :8], xs, wq, ws, None, torch.float32)

# ----------------------------------------------------------------------------- weight-only GEMMs

def _tolerance_vs(truth, ref, dtype):
    # 16-bit activations: the reference itself is off float64 by the 16-bit rounding of its
    # inputs, weights and output; the kernel rounds the inputs and output the same way (the
    # weight codes it keeps exact, scaling the float32 sums), accumulating in another order;
    # float32: the float32 GEMM's rounding
    return 1.25 * rel_err(ref, truth) + (1e-5 if dtype == torch.float32 else 1e-4)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", MKN)
@pytest.mark.parametrize("split_k", [None, 3])
def test_w8a16_matches_float64(dtype, m, k, n, split_k):
    x, w, bias = fresh(m, k, dtype=dtype), fresh(n, k), fresh(n)
    wq, ws = ops.quantize_per_channel_ref(w)
    y = triton_weight_only.linear_w8a16(x, wq, ws, bias, split_k=split_k)
    truth = ops.linear_w8a16_ref(x.double(), wq, ws.double(), bias.double())
    ref = ops.linear_w8a16_ref(x, wq, ws, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, truth) <= _tolerance_vs(truth, ref, dtype)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 100, 24), (33, 100, 70), (3, 576, 17)])
# K = 100 and 576 are not multiples of 64 / 128; groups under 32 take the scale-in-the-tile path
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("split_k", [None, 3])
def test_w4a16_matches_float64(dtype, m, k, n, group_size, symmetric, split_k):
    x, w, bias = fresh(m, k, dtype=dtype), fresh(n, k), fresh(n)
    p = int4.quantize(w, group_size, symmetric)
    smooth_inv = torch.rand(k, device=DEVICE) + 0.5 if split_k else None
    y = triton_weight_only.linear_w4a16(x, p.packed, p.scale, p.zero, smooth_inv, group_size, bias, split_k=split_k)
    truth = ops.linear_w4a16_ref(x.double(), p.packed, p.scale.double(), p.zero,
                                 None if smooth_inv is None else smooth_inv.double(), group_size, bias.double())
    ref = ops.linear_w4a16_ref(x, p.packed, p.scale, p.zero, smooth_inv, group_size, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, truth) <= _tolerance_vs(truth, ref, dtype)

@pytest.mark.parametrize("m", [1, 3, 33])  # the three paths: M = 1 GEMV, tensor-core GEMV, dequantize
@pytest.mark.parametrize("group_size", [16, 64])
def test_w4a16_never_reads_scales_past_the_last_group(m, group_size):
    # K = 576 is not a multiple of the kernels' K steps: a step can reach past the last group. The
    # scales and zero points are followed in memory by Inf / 255, so a read past them shows up
    # (a CI run once drew NaN this way, by chance, from whatever followed the scales)
    k, n = 576, 17
    x, w = fresh(m, k, dtype=torch.float16), fresh(n, k)
    p = int4.quantize(w, group_size, False)
    size = p.scale.numel()
    scale = torch.full((size + 4096,), float("inf"), device=DEVICE)[:size].view_as(p.scale)
    scale.copy_(p.scale)
    zero = torch.full((size + 4096,), 255, dtype=torch.uint8, device=DEVICE)[:size].view_as(p.zero)
    zero.copy_(p.zero)
    y = triton_weight_only.linear_w4a16(x, p.packed, scale, zero, None, group_size, None)
    truth = ops.linear_w4a16_ref(x.double(), p.packed, p.scale.double(), p.zero, None, group_size, None)
    ref = ops.linear_w4a16_ref(x, p.packed, p.scale, p.zero, None, group_size, None)
    assert torch.isfinite(y).all()
    assert rel_err(y, truth) <= _tolerance_vs(truth, ref, torch.float16)

def test_w4a16_rejects_a_layout_that_does_not_fit():
    p = int4.quantize(fresh(8, 64), 32, True)
    with pytest.raises(ValueError, match=r"do not fit K=100 at group 32"):
        triton_weight_only.linear_w4a16(fresh(2, 100), p.packed, p.scale, None, None, 32, None)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        triton_weight_only.linear_w4a16(fresh(2, 64).double(), p.packed, p.scale, None, None, 32, None)
    q = int4.quantize(fresh(8, 96), 48, True)
    with pytest.raises(ValueError, match="group size 48 must be a power of two"):
        triton_weight_only.linear_w4a16(fresh(2, 96), q.packed, q.scale, None, None, 48, None)

# ----------------------------------------------------------------------------- tuning and support

def test_gemv_split_k_fills_the_gpu_and_keeps_slices_deep():
    # H100 (132 SMs), the decode shapes
    assert triton_tuning.gemv_split_k(11008, 4096, 132) == 2
    assert triton_tuning.gemv_split_k(4096, 11008, 132) == 8
    assert triton_tuning.gemv_split_k(4096, 512, 132) == 1  # a 512-deep K is not split
    assert triton_tuning.m_bucket(1) == 1 and triton_tuning.m_bucket(17) == 64
    assert triton_tuning.m_bucket(100000) == 4096

def test_every_config_set_is_nonempty_and_small():
    for configs in (triton_tuning.ALL_W8A8, triton_tuning.ALL_W8A8_GEMV, triton_tuning.ALL_WEIGHT_ONLY_GEMV,
                    triton_tuning.ALL_WEIGHT_ONLY_GEMV1, triton_tuning.ALL_PACKED_GEMV, triton_tuning.ALL_PACKED_GEMM):
        assert 1 <= len(configs) <= 8

def test_cpu_without_the_interpreter_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(triton_support.TritonUnavailable, match="TRITON_INTERPRET=1"):
        triton_support.require(torch.device("cpu"))
    assert not triton_support.available(torch.device("cpu"))

@pytest.mark.parametrize("n,k", [(40, 576), (17, 100)])
@pytest.mark.parametrize("group_size", [16, 64, 1024])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_dequantize_kernel_is_bit_identical_to_the_reference(n, k, group_size, symmetric, dtype):
    # the prefill path's weight: exactly the reference's, so the GEMM after it is cuBLAS's alone
    p = int4.quantize(fresh(n, k), group_size, symmetric)
    out = triton_weight_only.dequantize(p.packed, p.scale, p.zero, n, k, 4, group_size, dtype)
    assert torch.equal(out, int4.dequantize(p.packed, p.scale, p.zero, group_size, k).to(dtype))
