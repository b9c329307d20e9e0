"""explain(): one record per linear/attention op, with scheme, reason and SQNR."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompiler
from models import Stack


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out, self.unused = nn.Linear(32, 96), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v))


def test_report_lists_every_op_with_scheme_reason_and_sqnr():
    torch.manual_seed(0)
    model, x = WithAttention().eval(), torch.randn(2, 6, 32)
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-static", "skip": ["out"]})
    fast(x)
    report = qcompiler.explain(fast)
    rec = {(r.module, r.op): r for r in report}
    assert rec[("qkv", "linear")].scheme == "w8a8-static" and rec[("qkv", "linear")].sqnr_db > 25
    assert rec[("out", "linear")].scheme == "floating point" and "skip" in rec[("out", "linear")].reason
    attention = [r for r in report if r.op == "attention"]
    assert len(attention) == 1 and attention[0].scheme == "floating point" and attention[0].reason
    assert rec[("unused", "linear")].scheme == "not compiled"
    text = str(report)
    for needle in ("qkv", "w8a8-static", "floating point", "attention", "not compiled", "SQNR dB"):
        assert needle in text
    assert qcompiler.explain(model).records == report.records  # the model or its compiled form


def test_weight_bytes_are_about_a_quarter():
    torch.manual_seed(0)
    model = Stack(d=128, h=256, head=64)
    fast = torch.compile(model, backend="qcompile")
    fast(torch.randn(1, 4, 128))
    fp32, q = qcompiler.explain(fast).weight_bytes
    assert fp32 == sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    assert q / fp32 < 0.27  # int8 values plus one float32 scale per output channel


class _Norm(nn.Module):
    """A linear after an RMS norm whose ``eps`` is a module attribute and whose output scale is a
    Python float argument of the call."""

    def __init__(self):
        super().__init__()
        self.lin, self.eps = nn.Linear(32, 16), 1e-6

    def forward(self, x, scale: float = 1.0):
        return self.lin(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * scale


@pytest.mark.parametrize("specialize_float", [False, True])
def test_floats_dynamo_lifts_to_tensors_are_reported_with_the_setting_that_keeps_them_constant(specialize_float):
    """A module's float attributes are constants of the graph (qcompile has Dynamo trace them so);
    a float argument of the call stays a tensor input under dynamic=True, and explain says so."""
    model = _Norm().eval()
    fast = torch.compile(model, backend="qcompile", options={"target": "reference"}, dynamic=True)
    with torch._dynamo.config.patch(specialize_float=specialize_float), torch.no_grad():
        fast(torch.randn(2, 5, 32), 0.5)
    notes = [n for n in qcompiler.explain(fast).notes if "Python float" in n]
    if specialize_float:
        assert not notes
    else:
        assert len(notes) == 1 and "passes 1 Python float(s)" in notes[0] and "specialize_float = True" in notes[0]
