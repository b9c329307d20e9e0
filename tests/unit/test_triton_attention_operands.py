"""The 8-bit attention's K and V operand kernels (runtimes/triton_attention_operands.py) against the
reference's codes: V per channel bit-identical, K (its mean summed in another order) within one code."""
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

from qcompiler.ir import attention, ops  # noqa: E402
from qcompiler.runtimes import triton_attention_operands as tao  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QDTYPES = [torch.int8, ops.FP8]


def _kv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2 + torch.randn(shape[-1], generator=g) * 4  # channel offsets
    return x.to(dtype).to(DEVICE)


def _codes(t):
    return (t.view(torch.uint8) if t.dtype == ops.FP8 else t).to(torch.int16)


@pytest.mark.parametrize("qdtype", QDTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 5, 24), (2, 1, 300, 80), (1, 3, 64, 64)])  # 300 tokens: two programs
def test_values_per_channel_are_the_references_codes(qdtype, dtype, shape):
    v = _kv(shape, dtype, 0)
    codes, scales = tao.values_per_channel(v, qdtype)
    ref_t, ref_s = ops.quantize_per_token_ref(v.transpose(-1, -2).to(torch.float32), None, qdtype)
    assert codes.shape == v.shape and codes.is_contiguous()
    assert torch.equal(scales, ref_s)
    assert torch.equal(_codes(codes), _codes(ref_t.transpose(-1, -2)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 2, 5, 24), (2, 1, 300, 80), (1, 3, 64, 64)])
def test_smoothed_keys_are_the_references_codes_within_one(dtype, shape):
    k = _kv(shape, dtype, 1)
    codes, scales = tao.smoothed_keys(k, attention.QK_DTYPE)
    ref_q, ref_s = ops.quantize_per_token_ref(attention.smooth_keys(k.to(torch.float32)), None, attention.QK_DTYPE)
    assert codes.shape == k.shape and scales.shape == (*shape[:-1], 1)
    assert torch.allclose(scales, ref_s, rtol=1e-5, atol=0)
    diff = (_codes(codes) - _codes(ref_q)).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3  # only where a quotient sits on a half


def test_nan_gives_nan_scales_as_the_reference():
    k = _kv((1, 2, 40, 16), torch.float32, 2)
    k[0, 1, 7, 3] = float("nan")
    _, sk = tao.smoothed_keys(k, attention.QK_DTYPE)
    assert sk[0, 1].isnan().all() and torch.isfinite(sk[0, 0]).all()  # the NaN channel's mean reaches every key
    _, sv = tao.values_per_channel(k, torch.int8)
    assert sv[0, 1, 3].isnan().all() and torch.isfinite(sv[0, 1, :3]).all() and torch.isfinite(sv[0, 0]).all()


def test_strided_inputs_are_read_in_place():
    k = _kv((1, 6, 2, 48), torch.bfloat16, 3).transpose(1, 2)  # [B, H, L, D] view with unit stride along D
    codes, scales = tao.values_per_channel(k, torch.int8)
    ref_t, ref_s = ops.quantize_per_token_ref(k.transpose(-1, -2).to(torch.float32), None, torch.int8)
    assert torch.equal(scales, ref_s) and torch.equal(codes, ref_t.transpose(-1, -2))
