"""Each q-op's reference implementation against float64 math, and its fake implementation."""
import pytest
import torch

from conftest import rel_err
from qcompiler.ir import kv, numerics, ops

qops = torch.ops.qcompile
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 7), (33, 64), (5, 4, 97), (2, 1536)]  # M=1, M=33, 3-D, odd K, K > 1024


def f64_quant(x64, scale64):
    return torch.clamp(torch.round(x64 / scale64), -128, 127)


@pytest.mark.parametrize("n,k", [(1, 1), (16, 33), (97, 576), (8, 1536)])
def test_quantize_per_channel_matches_float64(n, k):
    w = torch.randn(n, k) * torch.rand(n, 1) * 3
    q, s = ops.quantize_per_channel_ref(w)
    s64 = w.double().abs().amax(1) / 127
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (n,)
    assert torch.allclose(s.double(), s64, rtol=1e-6, atol=0)  # float32 rounding of one division
    # same scale: exact, except that the op divides in float32, so a quotient within float32
    # rounding of a .5 tie may round the other way; any other mismatch is a bug
    quotient = w.double() / s.double()[:, None]
    mismatch = q.double() != f64_quant(w.double(), s.double()[:, None])
    near_tie = ((quotient.abs() % 1) - 0.5).abs() < 1e-5 * quotient.abs().clamp_min(1)
    assert not (mismatch & ~near_tie).any()
    assert mismatch.float().mean() < 1e-3
    # each row's largest magnitude maps to +-127: the full grid is used
    assert torch.equal(q.abs().amax(1), torch.full((n,), 127, dtype=torch.int8))


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_quantize_per_channel_by_blocks_of_rows_is_the_same_as_whole(monkeypatch, qdtype):
    """A weight larger than ``numerics.WEIGHT_CHUNK_ELEMENTS`` elements is quantized a block of rows at a time (an
    embedding table's temporaries): the same codes and scales as one pass, bit for bit, with a
    last block shorter than the others and a row of zeros and a NaN row among them."""
    w = torch.randn(103, 40) * torch.rand(103, 1) * 5
    w[17] = 0
    w[60, 3] = float("nan")
    whole = ops._per_channel(w, qdtype)
    monkeypatch.setattr(numerics, "WEIGHT_CHUNK_ELEMENTS", 7 * 40)  # blocks of 7 rows, the last of 5
    blocked = ops.quantize_per_channel_ref(w, qdtype)
    assert blocked[0].dtype == qdtype and blocked[0].shape == w.shape
    assert torch.equal(blocked[0].view(torch.uint8), whole[0].view(torch.uint8))
    assert torch.equal(blocked[1].nan_to_num(-1), whole[1].nan_to_num(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_per_token_matches_float64(dtype, shape):
    x = torch.randn(shape).to(dtype)
    inv = torch.rand(shape[-1]) + 0.5
    q, s = ops.quantize_per_token(x, inv)
    xs = x.double() * inv.double()
    assert s.shape == (*shape[:-1], 1)
    assert torch.allclose(s.double(), xs.abs().amax(-1, keepdim=True) / 127, rtol=1e-6, atol=0)
    # the op multiplies by 1/s in float32 before dividing; allow an off-by-one only at exact .5 ties
    diff = (q.double() - f64_quant(xs, s.double())).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    # dequantized error is at most half a step per element
    assert ((q.double() * s.double() - xs).abs() <= s.double() * 0.5 + 1e-6).all()


def test_per_token_all_zero_row_and_huge_outlier():
    x = torch.randn(4, 65)
    x[1] = 0.0
    x[2, 7] = 1e6
    q, s = ops.quantize_per_token(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(q[1], torch.zeros(65, dtype=torch.int8))
    assert q[2, 7] == 127 and q[2].abs().sum() == 127  # the outlier eats the row's range
    assert rel_err(q[0].double() * s[0].double(), x[0]) < 0.01  # other rows untouched by it


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_per_tensor_saturates_and_rounds_half_even(dtype):
    scale = torch.tensor(0.5)
    x = torch.tensor([0.25, 0.75, -0.25, 1000.0, -1000.0, 63.25]).to(dtype)
    q = ops.quantize_per_tensor(x, scale)
    assert q.tolist() == [0, 2, 0, 127, -128, 126]  # .5 ties to even, saturation to [-128, 127]


def test_dequantize_broadcasts():
    q = torch.randint(-128, 128, (3, 5), dtype=torch.int8)
    s = torch.rand(3, 1)
    assert torch.equal(ops.dequantize_ref(q, s), q.float() * s)


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (33, 64, 40), (17, 1536, 24), (4, 2500, 9)])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_w8a8_integer_product_is_exact(m, k, n, per_token, with_bias):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    xq[0], wq[0] = -128, -128  # the worst-case magnitude product, summed K times
    xs = torch.rand(m, 1) + 0.1 if per_token else torch.tensor(0.37)
    ws = torch.rand(n) + 0.1
    bias = torch.randn(n) if with_bias else None
    out = ops.linear_w8a8(xq, xs, wq, ws, bias, torch.float32)
    acc = xq.long() @ wq.long().t()  # exact integer reference
    assert torch.equal(ops.int_matmul(xq, wq), acc.double())
    ref = acc.double() * xs.double() * ws.double() + (bias.double() if with_bias else 0)
    assert rel_err(out, ref) < 1e-7  # one float32 rounding of the final value


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_w8a16_matches_float64(dtype):
    x = torch.randn(5, 3, 96).to(dtype)
    wq = torch.randint(-128, 128, (40, 96), dtype=torch.int8)
    ws, bias = torch.rand(40) * 0.01, torch.randn(40)
    out = ops.linear_w8a16(x, wq, ws, bias)
    ref = x.double() @ (wq.double() * ws.double()[:, None]).t() + bias.double()
    assert out.dtype == dtype
    # float32: accumulation rounding; half types: the dequantized weight and the GEMM in 16 bits
    assert rel_err(out, ref) < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]


def _kv_fields(x, scheme, per, group) -> tuple:
    q = kv.quantize(x, scheme, per, group)
    return q.codes, q.scale, q.offset, scheme, per, q.group


OPCHECK_CASES = [
    (qops.quantize_per_token, lambda: (torch.randn(2, 3, 12), torch.rand(12) + 0.5)),
    (qops.quantize_per_token, lambda: (torch.randn(3, 12), None)),
    (qops.quantize_per_tensor, lambda: (torch.randn(3, 12), torch.tensor(0.1), None)),
    (qops.linear_w8a8, lambda: (torch.randint(-5, 5, (2, 3, 12), dtype=torch.int8), torch.rand(2, 3, 1),
                                torch.randint(-5, 5, (7, 12), dtype=torch.int8), torch.rand(7), torch.randn(7),
                                torch.float16)),
    (qops.linear_w8a16, lambda: (torch.randn(3, 12), torch.randint(-5, 5, (7, 12), dtype=torch.int8),
                                 torch.rand(7), None)),
    (qops.attention_q8, lambda: (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8),
                                 torch.ones(2, 1, 5, 7, dtype=torch.bool), False, None, torch.int8)),
    (qops.attention_q8, lambda: (torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8),
                                 None, True, 0.3, ops.FP8)),
    (qops.attention_q8_static, lambda: (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8),
                                        torch.ones(2, 1, 5, 7, dtype=torch.bool), False, None, torch.rand(4, 1, 8) + 0.5,
                                        torch.randn(2, 1, 8), torch.rand(2, 1, 8) + 0.5, *torch.rand(4) / 10 + 0.01,
                                        ops.FP8)),
    (qops.kv_dequantize, lambda: (*_kv_fields(torch.randn(2, 2, 32, 8), "int4", "channel", 16), torch.float16)),
    (qops.kv_dequantize, lambda: (*_kv_fields(torch.randn(1, 3, 5, 16), "int8", "token", 8), torch.float32)),
    (qops.attention_quantized_kv, lambda: (
        torch.randn(2, 4, 3, 8), *_kv_fields(torch.randn(2, 2, 32, 8), "int4", "channel", 16)[:3], torch.randn(2, 2, 5, 8),
        *_kv_fields(torch.randn(2, 2, 32, 8), "int4", "token", 16)[:3], torch.randn(2, 2, 5, 8),
        torch.ones(2, 1, 3, 37, dtype=torch.bool), False, None, "int4", 16, 8)),
]


@pytest.mark.parametrize("op,make", OPCHECK_CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_opcheck_fake_and_schema(op, make):
    # schema, fake (meta) implementation and Dynamo/AOT traceability, as torch.library checks them
    torch.library.opcheck(op, make(), test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_reference_table_covers_every_op():
    assert set(ops.REFERENCE) == {getattr(qops, n).default for n in (
        "quantize_per_token", "quantize_per_tensor",
        "linear_w8a8", "linear_w8a8_blocks", "linear_w8a16", "linear_w4a16", "embedding_int8", "attention_q8", "attention_q8_static",
        "kv_dequantize", "attention_quantized_kv")}


class QLinear(torch.nn.Module):
    """A module written directly in q-ops, as the quantize pass emits them."""

    def __init__(self, w):
        super().__init__()
        wq, ws = ops.quantize_per_channel_ref(w)
        self.register_buffer("wq", wq)
        self.register_buffer("ws", ws)

    def forward(self, x):
        xq, xs = qops.quantize_per_token(x, None)
        return qops.linear_w8a8(xq, xs, self.wq, self.ws, None, x.dtype)


def test_torch_export_keeps_the_qops_with_a_dynamic_batch():
    torch.manual_seed(0)
    mod, x = QLinear(torch.randn(24, 40)), torch.randn(5, 40)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(mod, (x,), dynamic_shapes=({0: batch},))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert {qops.quantize_per_token.default, qops.linear_w8a8.default} <= targets
    x2 = torch.randn(11, 40)
    assert torch.equal(ep.module()(x2), mod(x2))


# ----------------------------------------------------------------------------- FP8 (E4M3)

FP8 = torch.float8_e4m3fn


def f64_fp8(x64):
    """Round float64 values to E4M3 (nearest even), saturating at +-448, back in float64."""
    return torch.clamp(x64, -448, 448).to(FP8).double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_per_token_matches_float64(shape, dtype):
    x = (torch.randn(shape) * 3).to(dtype)
    q, s = ops.quantize_per_token(x, None, FP8)
    assert q.dtype == FP8 and s.shape == (*shape[:-1], 1)
    s64 = x.double().abs().amax(-1, keepdim=True) / 448
    assert torch.allclose(s.double(), s64, rtol=1e-6, atol=0)
    ref = f64_fp8(x.double() / s.double())
    # the op divides in float32: a quotient within float32 rounding of an E4M3 tie may go either way
    assert (q.double() != ref).float().mean() < 1e-3
    assert torch.equal(q.double().abs().amax(-1), torch.full(shape[:-1], 448.0, dtype=torch.float64))


def test_fp8_per_tensor_saturates_instead_of_nan():
    q = ops.quantize_per_tensor(torch.tensor([1e6, -1e6, 0.5, float("inf")]), torch.tensor(1.0), None, FP8)
    assert q.double().tolist() == [448.0, -448.0, 0.5, 448.0]  # E4M3 has no inf: saturate


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (33, 576, 40), (4, 2500, 9)])
def test_linear_fp8_product_is_exact(m, k, n):
    xq = (torch.randn(m, k) * 100).clamp(-448, 448).to(FP8)
    wq = (torch.randn(n, k) * 100).clamp(-448, 448).to(FP8)
    xs, ws = torch.rand(m, 1) + 0.1, torch.rand(n) + 0.1
    out = ops.linear_w8a8(xq, xs, wq, ws, None, torch.float32)
    # exact reference: every E4M3 value is a multiple of 2**-9, so scaled up they are integers
    acc = ((xq.double() * 512).long() @ (wq.double() * 512).long().t()).double() / 2**18
    assert torch.equal(ops.exact_matmul(xq, wq), acc)
    assert rel_err(out, acc * xs.double() * ws.double()) < 1e-7


def test_linear_w8a8_rejects_mixed_operands():
    with pytest.raises(ValueError, match="two int8 or two float8_e4m3fn"):
        ops.linear_w8a8_ref(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1),
                            torch.zeros(3, 4, dtype=FP8), torch.ones(3), None, torch.float32)


@pytest.mark.parametrize("op,make", [
    (qops.quantize_per_token, lambda: (torch.randn(2, 3, 12), torch.rand(12) + 0.5, FP8)),
    (qops.quantize_per_tensor, lambda: (torch.randn(3, 12), torch.tensor(0.1), None, FP8)),
    (qops.linear_w8a8, lambda: (torch.randn(3, 12).to(FP8), torch.rand(3, 1), torch.randn(7, 12).to(FP8),
                                torch.rand(7), None, torch.float32)),
], ids=["per_token", "per_tensor", "linear"])
def test_opcheck_fp8(op, make):
    args = make()
    # opcheck's schema test compares inputs with arithmetic that has no CPU float8 kernel, so for
    # float8 *inputs* it cannot run; the fake-tensor and AOT tests still cover those ops
    has_fp8_input = any(isinstance(a, torch.Tensor) and a.dtype == FP8 for a in args)
    utils = ("test_faketensor", "test_aot_dispatch_static") + (() if has_fp8_input else ("test_schema",))
    torch.library.opcheck(op, args, test_utils=utils)
