"""The ``ort`` target's rewrites for the CPU it runs on: few-row GEMMs (w8a8, w8a16, w4a16) as
``MatMulNBits`` with int8 activations, many-row weight-only INT8 GEMMs as two per-token int8
passes, and INT8 weights stored signed where u8 x s8 is exact.

Each rewritten graph runs in ONNX Runtime on fresh random inputs against float64 (the linear of
the same quantized weights): a few-row w8a8 GEMM must be at least as accurate as the q-op
reference (it rounds activations per block of a row, never more coarsely than per row), a
weight-only one (4- or 8-bit) within the error of int8 activations, a many-row weight-only one within
the two passes' rounding, the signed weights bit for bit the unsigned ones; a
NaN must reach its row's outputs.
"""
import numpy as np
import pytest
import torch

from conftest import rel_err
from models import QOp
from qcompiler.ir import ops
from qcompiler.lowering import onnx_decode_gemv
from qcompiler.lowering.onnx import to_onnx
from qcompiler.runtimes.ort_int8_probe import signed_weights_exact
from qcompiler.runtimes.ort_session import OrtSession


def _ops(proto) -> list:
    return [n.op_type for n in proto.graph.node]


def _float64_linear(m: QOp, x: torch.Tensor) -> torch.Tensor:
    """The linear of ``m``'s quantized weights (dequantized) on ``x`` in float64: the rounding of
    the activations is the only error a kernel adds to it."""
    w = m.wq.double() * m.ws.double().reshape(-1, 1)
    x = x.double() * (m.inv.double() if m.inv is not None else 1)
    y = x @ w.T
    return y + m.bias.double() if m.bias is not None else y


@pytest.mark.parametrize("rows", range(1, onnx_decode_gemv.MAX_ROWS + 1))
@pytest.mark.parametrize("k", [576, 96, 1536])
@pytest.mark.parametrize("smooth,bias", [(False, True), (True, False)])
def test_few_row_w8a8_gemm_is_matmulnbits_at_least_as_accurate_as_the_reference(rows, k, smooth, bias):
    torch.manual_seed(rows * k)
    m = QOp("dynamic", 80, k, smooth=smooth, bias=bias)
    proto = to_onnx(m, (torch.randn(1, rows, k),), "ort", dynamic=False, host=True)
    used = _ops(proto)
    assert "MatMulNBits" in used and "MatMulIntegerToFloat" not in used and "QuantizeLinear" not in used, used
    session = OrtSession(proto)
    errors = []
    for seed in range(40):
        torch.manual_seed(100 + seed)
        x = torch.randn(1, rows, k) * (1 + 5 * torch.rand(k))  # channels of unequal range
        exact = _float64_linear(m, x)
        errors.append((rel_err(session(x)[0], exact), rel_err(m(x), exact)))
    fast, reference = np.asarray(errors).T
    # rounding is noise: one input may round worse, the finer scales win on average (by 15-30%)
    assert fast.mean() < reference.mean() and (fast < 1.5 * reference).all(), (fast.mean(), reference.mean())


def test_many_row_gemms_keep_the_integer_gemm():
    m = QOp("dynamic", 64, 576)
    proto = to_onnx(m, (torch.randn(1, onnx_decode_gemv.MAX_ROWS + 1, 576),), "ort", dynamic=False, host=True)
    assert "MatMulIntegerToFloat" in _ops(proto) and "MatMulNBits" not in _ops(proto)
    dynamic = to_onnx(m, (torch.randn(1, 2, 576),), "ort", host=True)  # rows not static: left alone
    assert "MatMulNBits" not in _ops(dynamic)


def test_a_portable_export_has_no_host_rewrites():
    m = QOp("dynamic", 64, 576)
    proto = to_onnx(m, (torch.randn(1, 1, 576),), "ort", dynamic=False)
    assert "MatMulNBits" not in _ops(proto)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == 2 for t in weights)  # uint8, exact on every CPU


@pytest.mark.parametrize("kind,bits", [("w4a16", 4), ("w8a16", 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_weight_only_gemm_takes_int8_activations_within_their_error(kind, bits, bias):
    torch.manual_seed(bits)
    m = QOp(kind, 96, 576, group=32, bias=bias)
    proto = to_onnx(m, (torch.randn(1, 1, 576),), "ort", dynamic=False, host=True)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    assert nodes and all(a.get("accuracy_level") == 4 and a.get("bits", 4) == bits for a in attrs), attrs
    assert "Cast" not in _ops(proto)  # no float copy of an INT8 weight is left to fold
    session = OrtSession(proto)
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randn(1, 1, 576)
        reference = m(x).double()
        # int8 activations rounded per block of 32-64: well under 1% of the output's norm on normal data
        assert 1e-5 < rel_err(session(x)[0], reference) < 1e-2, seed


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("k", [576, 96])
@pytest.mark.parametrize("bias", [True, False])
def test_many_row_weight_only_int8_gemm_takes_two_int8_passes_within_their_rounding(dynamic, k, bias):
    torch.manual_seed(k + dynamic)
    m = QOp("w8a16", 80, k, bias=bias)
    proto = to_onnx(m, (torch.randn(2, onnx_decode_gemv.MAX_ROWS + 4, k),), "ort", dynamic=dynamic, host=True)
    exact, why = signed_weights_exact()
    used = _ops(proto)
    if not exact:  # the u8 x u8 kernel is no faster than the float GEMM: the float copy stays
        assert "MatMul" in used and "MatMulIntegerToFloat" not in used, why
        return
    assert used.count("MatMulIntegerToFloat") == 2 and "MatMul" not in used and "MatMulNBits" not in used, used
    assert "Cast" not in used  # no float copy of the INT8 weight is left to fold
    session = OrtSession(proto)
    for seed in range(8):
        torch.manual_seed(200 + seed)
        shape = (1 + seed % 3, 3 + 11 * seed) if dynamic else (2, onnx_decode_gemv.MAX_ROWS + 4)  # new sizes if dynamic
        x = torch.randn(*shape, k) * (1 + 5 * torch.rand(k))
        exact_y = _float64_linear(m, x)
        two_pass = ops.linear_w8a8_two_pass_ref(x, None, m.wq, m.ws, m.bias, torch.float32)
        got = session(x)[0]
        # the two passes carry each activation within s / 508: far under the weights' own rounding,
        # 1e-4 of the output where one int8 pass (w8a8) leaves about 1e-2
        assert rel_err(got, exact_y) < 1e-4, seed
        assert rel_err(got, two_pass) < 1e-6, seed  # the reference's codes


def test_many_row_weight_only_int8_linears_of_one_input_share_one_pair_of_gemms():
    torch.manual_seed(5)
    ms = [QOp("w8a16", n, 192) for n in (64, 32, 32)]

    class Siblings(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.parts = torch.nn.ModuleList(ms)

        def forward(self, x):
            return tuple(p(x) for p in self.parts)

    proto = to_onnx(Siblings(), (torch.randn(1, 9, 192),), "ort", host=True)
    if not signed_weights_exact()[0]:
        pytest.skip(signed_weights_exact()[1])
    used = _ops(proto)
    assert used.count("MatMulIntegerToFloat") == 2 and used.count("QuantizeLinear") == 2 and "Split" in used, used
    x = torch.randn(2, 13, 192)
    for got, m in zip(OrtSession(proto)(x), ms):
        assert rel_err(got, _float64_linear(m, x)) < 1e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_reaches_the_row_through_the_two_int8_passes(bad):
    if not signed_weights_exact()[0]:
        pytest.skip(signed_weights_exact()[1])
    torch.manual_seed(3)
    m = QOp("w8a16", 64, 576)
    session = OrtSession(to_onnx(m, (torch.randn(1, 6, 576),), "ort", host=True))
    x = torch.randn(1, 6, 576)
    x[0, 2, 7] = bad
    out = session(x)[0]
    assert out[0, 2].isnan().all(), out[0, 2]
    assert torch.isfinite(out[0, [0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("kind", ["dynamic", "w4a16", "w8a16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_reaches_the_row_through_the_rewritten_gemm(kind, bad):
    torch.manual_seed(1)
    m = QOp(kind, 64, 576)
    proto = to_onnx(m, (torch.randn(1, 1, 576),), "ort", dynamic=False, host=True)
    assert "MatMulNBits" in _ops(proto)
    x = torch.randn(1, 1, 576)
    x[0, 0, 7] = bad
    out = OrtSession(proto)(x)[0]
    assert out.isnan().any() and not torch.isfinite(out).any(), out


def test_the_graph_output_keeps_its_name():
    m = QOp("dynamic", 64, 576, bias=False)  # the GEMM's scaled output is the graph's output
    plain = to_onnx(m, (torch.randn(1, 1, 576),), "ort", dynamic=False)
    proto = to_onnx(m, (torch.randn(1, 1, 576),), "ort", dynamic=False, host=True)
    assert "MatMulNBits" in _ops(proto)
    assert [o.name for o in proto.graph.output] == [o.name for o in plain.graph.output]
    x = torch.randn(1, 1, 576)
    assert rel_err(OrtSession(proto)(x)[0], m(x)) < 2e-2


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_signed_weights_give_the_unsigned_results_bit_for_bit(kind):
    torch.manual_seed(2)
    m = QOp(kind, 64, 384)
    example = (torch.randn(2, 16, 384),)
    plain, host = to_onnx(m, example, "ort"), to_onnx(m, example, "ort", host=True)
    exact, why = signed_weights_exact()
    types = {t.data_type for t in host.graph.initializer if len(t.dims) == 2}
    assert types == ({3} if exact else {2}), why  # int8 where exact here, else uint8
    x = torch.randn(3, 20, 384) * 4  # full-range codes: the products that saturate without VNNI
    assert torch.equal(OrtSession(host)(x)[0], OrtSession(plain)(x)[0])


def test_the_probe_says_why_when_it_refuses():
    exact, why = signed_weights_exact()
    assert isinstance(exact, bool) and (exact or "saturates" in why)
    assert np.asarray(exact).dtype == bool


@pytest.mark.parametrize("recipe,decode_kernel", [("w8a8", "MatMulNBits, 8-bit weights, int8 activations per block"),
                                                  ("w4a16", "MatMulNBits, 4-bit weights, int8 activations per block"),
                                                  ("w8a16", "MatMulNBits, 8-bit weights, int8 activations per block")])
def test_explain_names_the_kernel_of_each_gemm_of_generate(recipe, decode_kernel):
    import qcompiler
    from tiny_models import build, token_batch

    model, vocab = build("llama")
    model.forward = torch.compile(model.forward, backend="qcompile", options={"recipe": recipe}, dynamic=True)
    with torch.no_grad():
        model.generate(**token_batch(vocab, 1, 9), max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    text = str(qcompiler.explain(model))
    assert decode_kernel in text, text  # the decode step's GEMMs
    prefill = {"w8a8": "MatMulIntegerToFloat", "w4a16": "MatMulNBits, 4-bit weights, float activations",
               "w8a16": "MatMulIntegerToFloat" if signed_weights_exact()[0] else None}[recipe]  # w8a16's prompt: two
    # int8 passes where u8 x s8 is exact, else a float MatMul of a weight ONNX Runtime dequantizes
    assert prefill is None or prefill in text, text  # the prompt's, many rows
