"""Static 8-bit attention (the TensorRT form): the ``attention_q8_static`` reference against float64
attention with constants calibrated on other random inputs, the float32 and ONNX implementations
against the reference, the calibrated smoothing leaving the scores' softmax unchanged, NaN never
passing, calibration recording every attention call, and the pass through the CPU targets and
the TensorRT-form export's conformance checker (the pass on many architectures:
tests/unit/test_attention.py)."""
import pytest
import torch
import torch.nn.functional as F

import qcompiler
from qcompiler.calibration.state import state_of
from qcompiler.calibration.stats import AttentionStats
from qcompiler.errors import CalibrationError
from qcompiler.ir import ops
from qcompiler.lowering.inductor import attention_q8_static_float_gemm
from qcompiler.passes import attention_static
from qcompiler.runtimes.ort_int8_probe import signed_weights_exact
from qcompiler.passes.sqnr import sqnr_db
from test_attention import CASES, STATIC_FLOORS as FLOORS, assert_ort_matches_reference

QDTYPES = {"int8": torch.int8, "fp8": ops.FP8}


def _inputs(seed, b=2, hq=4, hkv=2, lq=7, lk=13, d=24, mask=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    # outlier channels in Q and K, alike in channels i and i + d/2 (the pairs rotary embeddings
    # rotate together), and a per-channel offset in K
    channel = torch.linspace(0.2, 4.0, d // 2).repeat(2)
    q, k = q * channel, k * channel.flip(0) + 3.0 * torch.linspace(-1, 1, d)
    m = None
    if mask == "bool":
        m = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        m[0, ..., lk - 4:] = False
    elif mask == "additive":
        m = torch.randn(b, hq, lq, lk, generator=g)
    return q, k, v, m


def _calibrated(case, fmt, seeds=range(100, 140)) -> attention_static.StaticAttention:
    hq, hkv, lq, lk, d, mask, _ = case
    stats = None
    for s in seeds:
        q, k, v, _ = _inputs(s, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d)
        stats = stats or AttentionStats.empty("attn", q, k, v)
        stats.update(q, k, v)
    return attention_static.constants(stats, QDTYPES[fmt])


def _float64(q, k, v, mask, causal, scale):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                          attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
                                          is_causal=causal, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("fmt", list(QDTYPES))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_against_float64_attention(fmt, case, seed):
    hq, hkv, lq, lk, d, mask, causal = case
    c = _calibrated(case, fmt)
    q, k, v, m = _inputs(seed, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, mask=mask)
    scale = d ** -0.5
    ref = _float64(q, k, v, m, causal, scale)
    got = torch.ops.qcompile.attention_q8_static(q, k, v, m, causal, scale, *c.tensors(), QDTYPES[fmt])
    assert got.dtype == q.dtype and got.shape == (2, hq, lq, d)
    assert sqnr_db(ref, got) > FLOORS[fmt], sqnr_db(ref, got)
    fast = attention_q8_static_float_gemm(q, k, v, m, causal, scale, *c.tensors(), QDTYPES[fmt])
    assert sqnr_db(got, fast) > 60


def test_calibrated_smoothing_and_shift_leave_the_softmax_unchanged():
    case = (4, 2, 7, 13, 24, None, False)
    c = _calibrated(case, "int8")
    q, k, _, _ = _inputs(5)
    scores = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)
    ks = ((k.double() - c.k_shift.double()) * c.k_mul.double()).repeat_interleave(2, 1)
    smoothed = (q.double() * c.q_mul.double()) @ ks.transpose(-1, -2)
    torch.testing.assert_close(torch.softmax(smoothed, -1), torch.softmax(scores, -1), rtol=1e-5, atol=1e-6)  # float32 s and 1/s
    # the smoothing balances the channels: without it the per-tensor scale follows Q's outliers
    plain = attention_static.constants(
        AttentionStats("a", c.q_mul.new_ones(4, 24), *([torch.zeros(2, 24)] * 2), torch.zeros(2, 24, dtype=torch.float64),
                       torch.ones(2, 24), 1), torch.int8)
    assert torch.equal(plain.q_mul, torch.ones_like(plain.q_mul))  # nothing to balance, nothing moved


def test_repeated_key_heads_give_the_same_constants():
    """transformers repeats GQA's key heads before the call on some paths only: calibration and the
    graph may see them repeated or not, and the constants must mean the same."""
    q, k, v, _ = _inputs(3, hq=4, hkv=2)
    once, twice = AttentionStats.empty("a", q, k, v), None
    once.update(q, k, v)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    twice = AttentionStats.empty("a", q, kr, vr)
    twice.update(q, kr, vr)
    for stats, heads in ((once, 4), (twice, 2)):
        a = attention_static.constants(attention_static.regrouped(stats, heads), torch.int8)
        b = attention_static.constants(attention_static.regrouped(once if stats is twice else twice, heads), torch.int8)
        for x, y in zip(a.tensors(), b.tensors()):
            torch.testing.assert_close(x, y)


def test_masked_rows_are_zero_and_nan_never_passes():
    case = (4, 2, 7, 13, 24, "bool", False)
    c = _calibrated(case, "int8")
    q, k, v, m = _inputs(0, mask="bool")
    m[1, ..., 3, :] = False  # one query row of the second sequence attends to nothing
    out = torch.ops.qcompile.attention_q8_static(q, k, v, m, False, None, *c.tensors(), torch.int8)
    assert (out[1, :, 3] == 0).all() and torch.isfinite(out).all()
    q[0, 1, 2, 5] = float("nan")  # INT8 codes cannot carry NaN: the op carries it past them
    out = torch.ops.qcompile.attention_q8_static(q, k, v, None, False, None, *c.tensors(), torch.int8)
    assert out[0, 1, 2].isnan().all() and torch.isfinite(out[1]).all()
    k[1, 0, 4, 0] = float("nan")  # a NaN key reaches every query of its sequence and heads
    out = torch.ops.qcompile.attention_q8_static(q, k, v, None, False, None, *c.tensors(), torch.int8)
    assert out[1, :2].isnan().all() and torch.isfinite(out[1, 2:]).all()


def test_calibration_records_every_attention_call_and_refuses_non_finite_inputs():
    from qcompiler.calibration.recorder import Recorder
    from tiny_models import build, token_batch

    model, vocab = build("llama")
    qcompiler.calibrate(model, [token_batch(vocab, 2, 16, seed=s) for s in range(2)], progress=False)
    recorded = state_of(model).attention
    assert sorted(recorded) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(s.tokens == 2 * 2 * 16 and torch.isfinite(s.k_sum).all() for s in recorded.values())
    rec = Recorder(model, 16, progress=False)
    q, k, v, _ = _inputs(0)
    with pytest.raises(CalibrationError, match="attention key .* NaN or Inf"):
        rec.observe_attention(q, k * float("nan"), v)


def test_static_attention_without_its_statistics_names_the_fix():
    from tiny_models import build, token_batch

    model, vocab = build("llama")
    qcompiler.calibrate(model, [token_batch(vocab, 2, 16)], progress=False)
    state_of(model).attention.clear()  # e.g. a state saved by a version that recorded none
    fast = torch.compile(model, backend="qcompile",
                         options={"recipe": "w8a8-smoothquant", "attention": "int8", "target": "reference"})
    with pytest.raises(CalibrationError, match="attention .* no calibration statistics.*qcompiler.calibrate"):
        with torch.no_grad():
            fast(**token_batch(vocab, 1, 8))


# ----------------------------------------------------------------------------- ONNX


class StaticAttention(torch.nn.Module):
    def __init__(self, constants, qdtype, causal):
        super().__init__()
        for i, t in enumerate(constants.tensors()):
            self.register_buffer(f"c{i}", t)
        self.qdtype, self.causal = qdtype, causal

    def forward(self, q, k, v, m=None):
        return torch.ops.qcompile.attention_q8_static(q, k, v, m, self.causal, None, *self.buffers(), self.qdtype)


@pytest.mark.parametrize("form", ["tensorrt", "ort"])
@pytest.mark.parametrize("fmt", list(QDTYPES))
@pytest.mark.parametrize("case", CASES)
def test_both_onnx_forms_run_the_reference_math_and_pass_the_checker(form, fmt, case):
    from qcompiler.deploy.onnx_check import check
    from qcompiler.lowering.onnx import to_onnx
    from qcompiler.runtimes.ort_session import OrtSession

    hq, hkv, lq, lk, d, mask, causal = case
    model = StaticAttention(_calibrated(case, fmt), QDTYPES[fmt], causal)
    inputs = [x for x in _inputs(0, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, mask=mask) if x is not None]
    proto = to_onnx(model, inputs, form, dynamic=False)
    ref, out = model(*inputs), OrtSession(proto)(*inputs)[0]
    assert sqnr_db(ref, out) > 60, (form, fmt, case)
    if form == "ort":  # the reference's NaN carrier is in the ORT form
        inputs[0][0, 0, 0, 1] = float("nan")
        out = OrtSession(proto)(*inputs)[0]
        assert out[0, 0, 0].isnan().all() and torch.isfinite(out[1]).all()
    matmul_inputs = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert len(matmul_inputs) == 2
    if form == "tensorrt":
        assert check(proto) == []
        producers = {o: n.op_type for n in proto.graph.node for o in n.output}
        # every MatMul operand comes from a DequantizeLinear (through K's transpose)
        for n in matmul_inputs:
            kinds = [producers.get(i) for i in n.input]
            assert all(kind in ("DequantizeLinear", "Transpose") for kind in kinds), kinds


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_static_attention_exports_in_the_tensorrt_form_and_runs_on_ort(arch, fmt, tmp_path):
    from qcompiler.deploy.onnx_check import check
    from tiny_models import build, token_batch

    model, vocab = build(arch)
    calibration = [token_batch(vocab, 2, 16, seed=s) for s in range(2)]
    qcompiler.calibrate(model, calibration, progress=False)
    batch = token_batch(vocab, 2, 12, padded=True)
    recipe = "w8a8-smoothquant" if fmt == "int8" else "fp8-static"
    # a layer whose static scale would lose too much falls back to w8a16, which the ort target runs
    # as two int8 passes per token where u8 x s8 is exact (each activation within s / 508: 1e-6 of
    # that kernel's own reference in tests/unit/test_onnx_host_kernels.py); the static codes after it
    # then round a few values across a boundary the reference does not: a bound of 40 dB there
    min_db = 40 if signed_weights_exact()[0] else 60
    assert_ort_matches_reference(model, batch, min_db=min_db, recipe=recipe, attention=fmt)
    path = str(tmp_path / "t.onnx")
    result = qcompiler.export_onnx(model, batch, path, recipe=recipe, form="tensorrt", options={"attention": fmt})
    assert any(d.op == "attention" and d.scheme == f"attention-{fmt}-static" for d in result.decisions)
    assert check(path) == []
