"""The packed-weight Triton kernels (runtimes/triton_packed.py) against float64 and the q-op references.

In Triton's CPU interpreter without a GPU (conftest sets TRITON_INTERPRET=1), compiled on a GPU:
fresh random inputs, K off every block and group size, NaN carried through.
"""
import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

from qcompiler.ir import int4, ops  # noqa: E402
from qcompiler.runtimes import triton_packed as tp  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fresh(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def _tolerance(truth, ref, dtype):
    # the reference is off float64 by the rounding of its 16-bit inputs, weight and output; the
    # GEMM rounds the same weight, the GEMV keeps the codes exact and scales float32 sums
    return 1.25 * rel_err(ref, truth) + (1e-5 if dtype == torch.float32 else 1e-4)


def _w4(m, k, n, group, symmetric, dtype, smooth, bias):
    x, w = fresh(m, k, dtype=dtype), fresh(n, k)
    p = int4.quantize(w, group, symmetric)
    s_inv = torch.rand(k, device=DEVICE) + 0.5 if smooth else None
    b = fresh(n) if bias else None
    return x, p, s_inv, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 100, 24), (1, 576, 70), (3, 100, 24), (33, 576, 17)])
@pytest.mark.parametrize("group", [8, 32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w4_matches_float64(dtype, m, k, n, group, symmetric):
    x, p, s_inv, b = _w4(m, k, n, group, symmetric, dtype, smooth=not symmetric, bias=symmetric)
    prepared = tp.prepare_w4(p.packed, p.scale, p.zero)
    truth = ops.linear_w4a16_ref(x.double(), p.packed, p.scale.double(), p.zero,
                                 None if s_inv is None else s_inv.double(), group, None if b is None else b.double())
    ref = ops.linear_w4a16_ref(x, p.packed, p.scale, p.zero, s_inv, group, b)
    for path in ("gemv", "gemm") if m == 1 else ("gemm",):
        y = tp.linear_packed(x, prepared[0], prepared[1], prepared[2] if len(prepared) > 2 else None, s_inv, b, n, 4,
                             group, path)
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_err(y, truth) <= _tolerance(truth, ref, dtype), path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 40, 24), (1, 576, 70), (1, 100, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_w8_gemv_matches_float64(dtype, m, k, n, bias):
    x, w, b = fresh(m, k, dtype=dtype), fresh(n, k), fresh(n) if bias else None
    wq, ws = ops.quantize_per_channel_ref(w)
    words, scale = tp.prepare_w8(wq, ws)
    truth = ops.linear_w8a16_ref(x.double(), wq, ws.double(), None if b is None else b.double())
    ref = ops.linear_w8a16_ref(x, wq, ws, b)
    y = tp.linear_packed(x, words, scale, None, None, b, n, 8, 0, "gemv")
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, truth) <= _tolerance(truth, ref, dtype)


def test_w8_codes_at_both_ends_of_the_range():
    # -128 / 127 / 0 in every byte position of a word: the sign flip and the field extraction
    k, n = 64, 8
    wq = torch.tensor([-128, 127, 0, -1, 1, -127, 64, -64], dtype=torch.int8, device=DEVICE).repeat(n, k // 8)
    ws = torch.rand(n, device=DEVICE) + 0.5
    x = fresh(1, k)
    words, scale = tp.prepare_w8(wq, ws)
    truth = ops.linear_w8a16_ref(x.double(), wq, ws.double(), None)
    assert rel_err(tp.linear_packed(x, words, scale, None, None, None, n, 8, 0, "gemv"), truth) < 1e-5


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_nan_in_the_activation_comes_out(path):
    x, p, _, _ = _w4(1, 64, 16, 32, False, torch.float32, False, False)
    x[0, 5] = float("nan")
    words, scale, zero = tp.prepare_w4(p.packed, p.scale, p.zero)
    assert torch.isnan(tp.linear_packed(x, words, scale, zero, None, None, 16, 4, 32, path)).all()


def test_packed_words_are_the_codes_in_order():
    p = int4.quantize(fresh(3, 32), 32, False)
    words = tp.prepare_w4(p.packed, p.scale, p.zero)[0]
    codes = torch.stack([p.packed & 15, p.packed >> 4], -1).reshape(3, 32).to(torch.int64)
    for j in range(8):
        assert torch.equal((words.to(torch.int64) >> (4 * j)) & 15, codes[:, j::8].t())


def test_what_cannot_be_packed_says_why():
    assert tp.packable(4, 64, 4) == (False, "packed words hold 8 INT4 codes of one group; groups of 4 are smaller")
    assert not tp.packable(8, 42, 0)[0] and "multiple of 4" in tp.packable(8, 42, 0)[1]
    wq, ws = ops.quantize_per_channel_ref(fresh(8, 32))
    with pytest.raises(ValueError, match="packed GEMM takes INT4"):
        tp.linear_packed(fresh(3, 32), *tp.prepare_w8(wq, ws), None, None, None, 8, 8, 0, "gemm")
    with pytest.raises(ValueError, match="takes one row"):
        x, p, _, _ = _w4(2, 32, 8, 32, True, torch.float32, False, False)
        tp.linear_packed(x, *tp.prepare_w4(p.packed, p.scale, None), None, None, None, 8, 4, 32, "gemv")
