"""The INT4 layout (qcompiler.ir.int4) and the linear_w4a16 q-op, against float64 math."""
import pytest
import torch

from conftest import rel_err
from qcompiler.ir import int4, numerics, ops

qops = torch.ops.qcompile
GROUPS = [16, 32, 64, 128]
KS = [64, 576, 100]  # a multiple of every group, SmolLM2's K = 576 (not a multiple of 128), odd groups


def f64_rtn(w, group_size, symmetric):
    """Round-to-nearest INT4 written out in float64, group by group, without the packed layout."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=torch.float64)
    for g0 in range(0, k, group_size):
        g = w[:, g0:g0 + group_size].double()
        if symmetric:
            hi, lo = g.amax(1, keepdim=True).clamp_min(0), g.amin(1, keepdim=True).clamp_max(0)
            scale = torch.maximum(hi / 7, -lo / 8).clamp_min(1e-12)   # -8 * scale reaches a negative extreme
            q = torch.clamp(torch.round(g / scale), -8, 7)
            out[:, g0:g0 + group_size] = q * scale
        else:
            hi, lo = g.amax(1, keepdim=True).clamp_min(0), g.amin(1, keepdim=True).clamp_max(0)
            scale = ((hi - lo) / 15).clamp_min(1e-12)
            z = torch.clamp(torch.round(-lo / scale), 0, 15)
            q = torch.clamp(torch.round(g / scale) + z, 0, 15)
            out[:, g0:g0 + group_size] = (q - z) * scale
    return out


@pytest.mark.parametrize("k", KS)
def test_pack_unpack_roundtrip_and_nibble_order(k):
    q = torch.randint(0, 16, (5, k + k % 2), dtype=torch.uint8)
    packed = int4.pack(q)
    assert packed.shape == (5, q.shape[1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(int4.unpack(packed), q)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble first (ONNX order)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_matches_float64(group_size, k, symmetric):
    w = torch.randn(24, k) * torch.rand(24, 1) * 3
    p = int4.quantize(w, group_size, symmetric)
    g = int4.groups(k, group_size)
    assert p.packed.shape == (24, g * group_size // 2) and p.scale.shape == (24, g)
    assert (p.zero is None) == symmetric
    ref = f64_rtn(w, group_size, symmetric)
    deq = p.dequantize().double()
    # float32 scale vs float64: an element may land on the other side of a .5 tie, nothing else
    step = (w.double().abs().amax() / 7).item()
    assert ((deq - ref).abs() > 1e-5 * step).float().mean() < 1e-3
    assert rel_err(deq, ref) < 1e-3
    # the padding (K not a multiple of the group) holds the zero point: weights of exactly 0
    codes = int4.unpack(p.packed)
    if g * group_size > k:
        pad = codes[:, k:]
        zero = 8 if symmetric else p.zero[:, -1:].expand_as(pad)
        assert torch.equal(pad, torch.as_tensor(zero, dtype=torch.uint8).expand_as(pad))


def test_symmetric_grid_reaches_either_extreme_without_saturating():
    w = torch.tensor([[-8.0, 1.0, 3.0, 0.5], [-2.0, 7.0, 0.0, 1.0], [8.0, -1.0, 0.0, 2.0]])
    p = int4.quantize(w, 4, symmetric=True)
    # a negative extreme takes code -8 (step 1 instead of 8 / 7); a positive one, code 7
    torch.testing.assert_close(p.scale[:, 0], torch.tensor([1.0, 1.0, 8 / 7]))
    deq = p.dequantize()
    assert deq[0, 0] == -8.0 and deq[1, 1] == 7.0 and torch.isclose(deq[2, 0], torch.tensor(8.0))
    assert (deq - w).abs().max() <= p.scale.max() / 2 + 1e-6  # nothing saturates


def test_exact_zeros_stay_zero_asymmetric():
    w = torch.randn(4, 64).abs() + 0.5  # all positive: the asymmetric grid still contains 0
    w[:, 5] = 0
    deq = int4.quantize(w, 32, symmetric=False).dequantize()
    assert torch.equal(deq[:, 5], torch.zeros(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,group_size", [(576, 128), (64, 32), (100, 16)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("smooth", [False, True])
def test_linear_w4a16_matches_float64(dtype, k, group_size, symmetric, smooth):
    w = torch.randn(40, k) * 0.05
    p = int4.quantize(w, group_size, symmetric)
    x = torch.randn(3, 5, k).to(dtype)
    inv = torch.rand(k) + 0.5 if smooth else None
    b = torch.randn(40)
    out = qops.linear_w4a16(x, p.packed, p.scale, p.zero, inv, group_size, b)
    w64 = p.dequantize().double()
    x64 = x.double() * (inv.double() if smooth else 1)
    ref = x64 @ w64.t() + b.double()
    assert out.dtype == dtype and out.shape == (3, 5, 40)
    assert rel_err(out, ref) < {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}[dtype]


def test_linear_w4a16_nan_input_gives_nan_not_a_number():
    p = int4.quantize(torch.randn(8, 32), 32, True)
    x = torch.randn(2, 32)
    x[0, 3] = float("nan")
    out = ops.linear_w4a16_ref(x, p.packed, p.scale, p.zero, None, 32, None)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_opcheck_w4a16(symmetric):
    p = int4.quantize(torch.randn(7, 40), 16, symmetric)
    args = (torch.randn(2, 3, 40), p.packed, p.scale, p.zero, torch.rand(40) + 0.5, 16, torch.randn(7))
    torch.library.opcheck(qops.linear_w4a16, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_centred_codes_times_scales_is_the_dequantized_weight():
    torch.manual_seed(0)
    for symmetric in (True, False):
        p = int4.quantize(torch.randn(8, 100), 32, symmetric)
        w = (int4.centred_codes(p) * p.scale[..., None]).reshape(8, -1)[:, :100]
        assert torch.equal(w, p.dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", ["none", "scalar", "per group"])
@pytest.mark.parametrize("shape,group_size", [((37, 64), 32), ((50, 72), 32), ((9, 130), 64)])
def test_a_large_weight_quantized_by_blocks_of_rows_is_the_same(monkeypatch, symmetric, clip, shape, group_size):
    g = torch.Generator().manual_seed(shape[0] + group_size)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3
    ratios = {"none": 1.0, "scalar": 0.9,
              "per group": 0.5 + 0.5 * torch.rand(shape[0], int4.groups(shape[1], group_size), generator=g)}[clip]
    whole = int4.quantize(w, group_size, symmetric, ratios)
    monkeypatch.setattr(numerics, "WEIGHT_CHUNK_ELEMENTS", 7 * shape[1])  # blocks of 7 rows, a shorter last one
    blocks = int4.quantize(w, group_size, symmetric, ratios)
    assert torch.equal(blocks.packed, whole.packed) and torch.equal(blocks.scale, whole.scale)
    assert (blocks.zero is None) == symmetric and (symmetric or torch.equal(blocks.zero, whole.zero))
    if clip == "none":  # and both are a round-to-nearest of w (clipping adds its own error)
        assert rel_err(blocks.dequantize(), w) < 0.2
