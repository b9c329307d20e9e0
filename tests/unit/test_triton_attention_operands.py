"""The 8-bit attention's operands in one launch (runtimes/triton_attention_operands.py) against the
reference's codes: Q per token and V per channel bit-identical, K (its mean summed in another
order than torch's) within one code."""
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

from qcompiler.ir import attention, ops  # noqa: E402
from qcompiler.runtimes import triton_attention_operands as tao  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QK = attention.QK_DTYPE


def _t(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2 + torch.randn(shape[-1], generator=g) * 4  # channel offsets
    return x.to(dtype).to(DEVICE)


def _codes(t):
    return (t.view(torch.uint8) if t.dtype == ops.FP8 else t).to(torch.int16)


@pytest.mark.parametrize("v_dtype", [torch.int8, ops.FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (B, Hq, Hkv, Lq, Lk, D): GQA, 300 tokens (two blocks of a head), D off the tile, decode (Lq 1)
@pytest.mark.parametrize("sizes", [(1, 4, 2, 5, 7, 24), (2, 2, 1, 300, 300, 80), (1, 3, 3, 1, 64, 64)])
def test_every_operand_is_the_references(v_dtype, dtype, sizes):
    b, hq, hkv, lq, lk, d = sizes
    q, k, v = _t((b, hq, lq, d), dtype, 0), _t((b, hkv, lk, d), dtype, 1), _t((b, hkv, lk, d), dtype, 2)
    qq, sq, kq, sk, vq, sv = tao.quantize_operands(q, k, v, QK, v_dtype)
    ref_q, ref_sq = ops.quantize_per_token_ref(q.to(torch.float32), None, QK)
    ref_k, ref_sk = ops.quantize_per_token_ref(attention.smooth_keys(k.to(torch.float32)), None, QK)
    ref_vt, ref_sv = ops.quantize_per_token_ref(v.transpose(-1, -2).to(torch.float32), None, v_dtype)
    assert all(t.is_contiguous() for t in (qq, kq, vq)) and vq.shape == v.shape
    assert torch.equal(sq, ref_sq) and torch.equal(qq, ref_q)
    assert torch.equal(sv, ref_sv) and torch.equal(_codes(vq), _codes(ref_vt.transpose(-1, -2)))
    assert torch.allclose(sk, ref_sk, rtol=1e-5, atol=0)
    diff = (_codes(kq) - _codes(ref_k)).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3  # only where a quotient sits on a half


def test_nan_gives_nan_scales_as_the_reference():
    q, k = _t((1, 2, 3, 16), torch.float32, 3), _t((1, 2, 40, 16), torch.float32, 4)
    k[0, 1, 7, 3] = float("nan")
    q[0, 0, 1, 2] = float("nan")
    _, sq, _, sk, _, sv = tao.quantize_operands(q, k, k, QK, torch.int8)
    assert sq[0, 0, 1].isnan().all() and torch.isfinite(sq[0, 0, [0, 2]]).all()
    assert sk[0, 1].isnan().all() and torch.isfinite(sk[0, 0]).all()  # the NaN channel's mean reaches every key
    assert sv[0, 1, 3].isnan().all() and torch.isfinite(sv[0, 1, :3]).all() and torch.isfinite(sv[0, 0]).all()


def test_strided_inputs_are_read_in_place():
    x = _t((1, 6, 2, 48), torch.bfloat16, 5).transpose(1, 2)  # [B, H, L, D] view, unit stride along D
    _, _, _, _, vq, sv = tao.quantize_operands(x, x, x, QK, torch.int8)
    ref_t, ref_sv = ops.quantize_per_token_ref(x.transpose(-1, -2).to(torch.float32), None, torch.int8)
    assert torch.equal(sv, ref_sv) and torch.equal(vq, ref_t.transpose(-1, -2))
