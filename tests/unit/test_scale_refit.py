"""Scale refit: least-squares group scales for fixed INT4 codes, checked against an explicit solve."""
import pytest
import torch

from qcompiler.algorithms import gptq, scale_refit
from qcompiler.ir import int4
from test_rounding import correlated_inputs, out_err


def explicit_refit(p, w, x):
    """Each row's best scales by ``torch.linalg.lstsq`` on the rows themselves (float64)."""
    n, g = p.scale.shape
    c = int4.centred_codes(p, torch.float64)                                              # [N, G, gs]
    xg = torch.nn.functional.pad(x.double(), (0, g * p.group_size - x.shape[1])).reshape(len(x), g, -1)
    y = x.double() @ w.double().t()
    out = torch.empty(n, g, dtype=torch.float64)
    for r in range(n):
        a = torch.einsum("tgi,gi->tg", xg, c[r])                                    # [T, G]
        out[r] = torch.linalg.lstsq(a, y[:, r:r + 1]).solution[:, 0]
    return out


@pytest.mark.parametrize("k,group_size", [(64, 16), (100, 32), (576, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_scales_are_the_least_squares_solution(k, group_size, symmetric):
    torch.manual_seed(k)
    w = torch.randn(24, k) * 0.05
    x = correlated_inputs(4 * k, k)
    p = int4.quantize(w, group_size, symmetric)
    r = scale_refit.refit(p, w, x.double().t() @ x.double())
    assert torch.equal(r.packed, p.packed) and (r.zero is None) == symmetric
    expected = explicit_refit(p, w, x)
    kept = (r.scale == p.scale).all(-1)          # rows whose solution was refused keep their scales
    assert kept.float().mean() < 0.5
    torch.testing.assert_close(r.scale[~kept].double(), expected[~kept], rtol=1e-4, atol=1e-7)
    assert out_err(x, w, r.dequantize()) < 0.95 * out_err(x, w, p.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_refit_never_worsens_a_row_and_scales_stay_positive(symmetric):
    torch.manual_seed(3)
    w = torch.randn(32, 96) * 0.05
    w[0] = 0.0                                   # an all-zero row: its codes carry no information
    x = correlated_inputs(384, 96)
    h = 2 * x.t() @ x / len(x)
    p = gptq.gptq(w, h, 32, symmetric, act_order=True)
    r = scale_refit.refit(p, w, h)
    assert (r.scale > 0).all() and torch.isfinite(r.scale).all()
    row_err = lambda q: (x @ (q.dequantize() - w).t()).pow(2).sum(0)
    assert (row_err(r) <= row_err(p) * (1 + 1e-5) + 1e-9).all()
    assert row_err(r).sum() < row_err(p).sum()


def test_refit_handles_row_chunks_like_one_pass():
    torch.manual_seed(4)
    w, x = torch.randn(40, 64), correlated_inputs(256, 64)
    p, h = int4.quantize(w, 16, True), x.t() @ x
    assert torch.equal(scale_refit.refit(p, w, h, chunk=7).scale, scale_refit.refit(p, w, h).scale)
