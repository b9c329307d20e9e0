"""``linear_w8a8_blocks``: INT8 activations per block of input channels (the ``w8a8-blocks`` recipe).

The reference is checked against a plain loop over blocks with exact integer dot products, for
its rounding bound (every value within half its own block's step, no block coarser than the
row), and for NaN. Every fast path (Inductor's float32 GEMM, ONNX Runtime's ``MatMulNBits`` at a
few static rows, the training fake quantization) is checked against the reference on fresh random
inputs, ragged last blocks and smoothing included. ONNX Runtime's form at more rows (two per-token
int8 passes) is checked against its own reference, ``quantize_two_pass_ref``, which is checked to
round every row finer than the blocks; whole models on every tiny architecture against FP32 and
the reference.
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import qcompiler
from conftest import rel_err
from models import QOp, Stack, with_outlier_channels
from qcompiler.errors import OptionError
from qcompiler.ir import ops
from qcompiler.lowering.inductor import linear_w8a8_blocks_float_gemm
from qcompiler.lowering.onnx import UnsupportedForm, to_onnx
from qcompiler.passes.sqnr import sqnr_db
from qcompiler.runtimes.ort_session import OrtSession
from qcompiler.schemes import fake_quant
from qcompiler.schemes.per_block_8bit import ACT_BLOCK
from tiny_models import ARCHITECTURES, build, token_batch

qops = torch.ops.qcompile


def _loop_reference(x, wq, ws, bias, block):
    """The op's definition written out: per row and block, amax, codes, exact integer dot products."""
    rows = x.reshape(-1, x.shape[-1]).double()
    k = rows.shape[1]
    out = torch.zeros(rows.shape[0], wq.shape[0], dtype=torch.float64)
    for start in range(0, k, block):
        part = rows[:, start:start + block]
        amax = part.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-12)
        codes = torch.clamp(torch.round(part.float() * (127.0 / amax)), -128, 127).to(torch.int64)
        dots = codes @ wq[:, start:start + block].to(torch.int64).t()  # exact integers
        out += dots.double() * (amax / 127.0).double()
    out = out * ws.double()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x.shape[:-1], wq.shape[0])


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 200), n=st.integers(1, 24), rows=st.integers(1, 6), block=st.sampled_from([16, 32, 64]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_is_the_blockwise_integer_sum(k, n, rows, block, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * (1 + 20 * torch.rand(k, generator=g))
    wq, ws = ops.quantize_per_channel_ref(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    got = ops.linear_w8a8_blocks_ref(x, None, wq, ws, b, block, torch.float64)
    assert rel_err(got, _loop_reference(x, wq, ws, b, block)) < 1e-6


@pytest.mark.parametrize("k", [32, 70, 576])
def test_each_value_is_rounded_within_its_own_block_step(k):
    torch.manual_seed(k)
    x = torch.randn(4, 9, k)
    x[..., 1] = 100.0  # an outlier channel in the first block
    q, s = ops.quantize_per_block_ref(x, ACT_BLOCK)
    assert s.shape == (4, 9, -(-k // ACT_BLOCK))
    step = s.repeat_interleave(ACT_BLOCK, dim=-1)[..., :k]
    assert ((ops.dequantize_blocks(q, s, ACT_BLOCK) - x).abs() <= step / 2 * (1 + 1e-6)).all()
    _, row_scale = ops.quantize_per_token_ref(x)
    assert (s <= row_scale * (1 + 1e-7)).all()  # no block coarser than its row
    if k > ACT_BLOCK:  # the outlier's block is coarse, the others are not
        assert (s[..., 1:] < s[..., :1] / 5).all()


def test_blocks_are_more_accurate_than_tokens_on_outlier_channels():
    errors = []
    for seed in range(20):
        torch.manual_seed(seed)
        m_blocks, m_tokens = QOp("blocks", 64, 256), QOp("dynamic", 64, 256)
        m_tokens.wq, m_tokens.ws, m_tokens.bias = m_blocks.wq, m_blocks.ws, m_blocks.bias
        x = torch.randn(3, 256)
        x[:, 3] = 60.0  # one outlier channel, as LLM activations have
        w = m_blocks.wq.double() * m_blocks.ws.double()[:, None]
        exact = x.double() @ w.T + m_blocks.bias.double()
        errors.append((rel_err(m_blocks(x), exact), rel_err(m_tokens(x), exact)))
    blocks, tokens = np.asarray(errors).T
    # one block in eight holds the outlier: the other seven round ~25x finer (measured: 2.8x less error)
    assert (blocks < tokens).all() and blocks.mean() < tokens.mean() / 2, (blocks.mean(), tokens.mean())


@pytest.mark.parametrize("path", ["reference", "inductor", "ort", "ort one row"])
def test_nan_and_inf_reach_their_row_only(path):
    torch.manual_seed(0)
    m = QOp("blocks", 24, 96)
    x = torch.randn(3, 96)
    x[0, 40] = float("nan")
    x[1, 5] = float("inf")
    expected = m(x[2:])
    if path == "reference":
        out = m(x)
    elif path == "inductor":
        out = linear_w8a8_blocks_float_gemm(x, None, m.wq, m.ws, m.bias, ACT_BLOCK, torch.float32)
    elif path == "ort":  # dynamic rows: the two passes
        out = OrtSession(to_onnx(m, (x,), "ort"))(x)[0]
        expected = ops.linear_w8a8_two_pass_ref(x[2:], None, m.wq, m.ws, m.bias, torch.float32)
    else:  # a static row: MatMulNBits
        session = OrtSession(to_onnx(m, (x[:1],), "ort", dynamic=False))
        out = torch.cat([session(row)[0] for row in x.split(1)])
    assert out[0].isnan().all() and out[1].isnan().all(), out[:2]
    assert rel_err(out[2:], expected) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 100])
@pytest.mark.parametrize("smooth", [False, True])
def test_inductor_float_gemm_matches_the_reference(dtype, k, smooth):
    torch.manual_seed(k)
    m = QOp("blocks", 40, k, smooth=smooth)
    for seed in range(3):
        torch.manual_seed(seed)
        x = with_outlier_channels(torch.randn(2, 7, k)).to(dtype)
        ref = ops.linear_w8a8_blocks_ref(x, m.inv, m.wq, m.ws, m.bias, ACT_BLOCK, dtype)
        out = linear_w8a8_blocks_float_gemm(x, m.inv, m.wq, m.ws, m.bias, ACT_BLOCK, dtype)
        assert out.dtype == dtype
        assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("n,k", [(64, 32), (48, 100), (96, 576)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (4,), (2, 2)])
def test_ort_matmulnbits_at_a_few_static_rows_matches_the_reference(n, k, smooth, bias, shape):
    torch.manual_seed(n + k)
    m = QOp("blocks", n, k, smooth=smooth, bias=bias)
    x = torch.randn(*shape, k)
    proto = to_onnx(m, (x,), "ort", dynamic=False)
    assert {node.op_type for node in proto.graph.node} == {"MatMulNBits", "MatMul", "Add"} | ({"Mul"} if smooth else set())
    session = OrtSession(proto)
    for xi in (x, with_outlier_channels(torch.randn(*shape, k))):
        assert rel_err(session(xi)[0], m(xi)) < 2e-6


@given(rows=st.integers(1, 5), k=st.integers(1, 300), spread=st.floats(0, 30), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_two_pass_codes_bound_every_value_finer_than_a_block(rows, k, spread, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * (1 + spread * torch.rand(k, generator=g))
    hi, lo, scale = ops.quantize_two_pass_ref(x)
    assert hi.abs().max() <= 127 and lo.abs().max() <= 127
    rebuilt = (hi.double() + lo.double() / ops.TWO_PASS_FINE) * scale.double()
    # the second pass leaves at most half of its grid's step (x / scale is a float32 division: off by
    # up to 127 * 2**-24 of a code, 254 times that on the second grid, 0.4% of its half step)
    assert ((rebuilt - x.double()).abs() <= scale.double() / (2 * ops.TWO_PASS_FINE) * (1 + 1e-2)).all()
    # and each row's error is below what per-block rounding leaves in it
    codes, block_scale = ops.quantize_per_block_ref(x, ACT_BLOCK)
    blocks = (ops.dequantize_blocks(codes, block_scale, ACT_BLOCK, torch.float64) - x.double()).norm(dim=-1)
    assert ((rebuilt - x.double()).norm(dim=-1) <= blocks + 1e-9 * x.double().norm(dim=-1)).all()


@pytest.mark.parametrize("n,k", [(64, 32), (48, 100), (96, 576)])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_ort_two_passes_match_their_reference_and_beat_the_blocks(n, k, smooth, bias):
    torch.manual_seed(n + k)
    m = QOp("blocks", n, k, smooth=smooth, bias=bias)
    x = torch.randn(3, 5, k)
    proto = to_onnx(m, (x,), "ort")  # dynamic rows
    ops_used = {node.op_type for node in proto.graph.node}
    assert "MatMulIntegerToFloat" in ops_used and "MatMulNBits" not in ops_used, ops_used
    session = OrtSession(proto)
    w = m.wq.double() * m.ws.double()[:, None]
    for xi in (x, with_outlier_channels(torch.randn(2, 11, k)), torch.randn(1, 1, k)):
        out = session(xi)[0]
        assert rel_err(out, ops.linear_w8a8_two_pass_ref(xi, m.inv, m.wq, m.ws, m.bias, torch.float32)) < 1e-6
        # against the float64 product of the same weights: at least ten times closer than the
        # per-block reference (measured: 60-300x)
        xs = xi.double() * (1 if m.inv is None else m.inv.double())
        exact = torch.nn.functional.linear(xs, w, None if m.bias is None else m.bias.double())
        assert rel_err(out.double(), exact) < rel_err(m(xi).double(), exact) / 10
    zeros = torch.zeros(1, 2, k)
    assert torch.equal(session(zeros)[0], m(zeros))  # a zero row: the bias alone


def test_ort_kernel_report_names_the_block_kernel_and_the_two_passes():
    torch.manual_seed(0)
    model = Stack(d=64, h=96, head=40)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-blocks", "target": "ort"})
    reference = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-blocks", "target": "reference"})
    one = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert rel_err(fast(one), reference(one)) < 1e-5  # one static row: MatMulNBits, the reference's math
        text = str(qcompiler.explain(fast))
        assert "MatMulNBits, 8-bit weights, int8 activations per block of 32" in text, text
        assert "MatMulIntegerToFloat" not in text, text
        assert "MatMul, float weights" not in text, text  # the NaN carriers are not reported as linears
        many = with_outlier_channels(torch.randn(2, 9, 64))
        float_out = model(many)
        assert sqnr_db(float_out, fast(many)) > sqnr_db(float_out, reference(many))  # the two passes: finer
    report = qcompiler.explain(fast)
    assert {r.scheme for r in report if r.op == "linear"} == {"w8a8-blocks"}
    assert "int8 codes of the per-token rounding residual (second pass)" in str(report), str(report)


def test_training_fake_quantization_is_the_reference_rounding():
    torch.manual_seed(0)
    x = with_outlier_channels(torch.randn(5, 100)).requires_grad_()
    fake = fake_quant.per_block(x, ACT_BLOCK, torch.int8)
    q, s = ops.quantize_per_block_ref(x.detach(), ACT_BLOCK)
    assert torch.equal(fake.detach(), ops.dequantize_blocks(q, s, ACT_BLOCK))
    fake.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unsupported_combinations_say_why():
    with pytest.raises(OptionError, match="no scheme quantizes fp8 weights, fp8 activations per block"):
        qcompiler.get_recipe("w8a8-blocks").replace(number_format="fp8")
    with pytest.raises(UnsupportedForm, match="static recipe"):
        to_onnx(QOp("blocks", 16, 32), (torch.randn(2, 32),), "tensorrt")
    from qcompiler.deploy.checkpoint import _why_not

    assert "per block" in _why_not(qcompiler.get_recipe("w8a8-blocks"))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_runs_the_recipe_on_the_default_target(arch):
    model, vocab = build(arch)
    batch = token_batch(vocab, 2, 12)
    with torch.no_grad():
        fp32 = model(**batch)[0]
        ref = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-blocks", "target": "reference"})(**batch)[0]
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-blocks"})
        out = fast(**batch)[0]
    assert sqnr_db(fp32, ref) > 25  # 64-wide random layers; real models: docs/results/cpu_decode.md
    # 24 rows: the two per-token passes, which round the activations finer than the reference's
    # blocks (the weights' rounding is the same): closer to FP32 than the reference
    assert sqnr_db(fp32, out) > sqnr_db(fp32, ref), arch
    assert {g.running for g in qcompiler.explain(fast).graphs} == {"ort"}
