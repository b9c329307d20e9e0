"""The 8-bit attention's three operands quantized in one Triton launch, in the layout its kernel reads.

``qcompile::attention_q8`` (``qcompiler.ir.attention``) quantizes Q per token, K per token after
subtracting its mean over tokens, and V per channel (one scale per channel over all tokens). Done
with torch ops and the per-token kernel, that is a float32 copy of K, its mean, the subtraction, a
transposed copy of V, three quantize passes and a transpose back that leaves V's codes strided
along the head dimension for the attention kernel: about nine launches. ``quantize_operands`` is
one launch of ``_operands_kernel``, whose programs split three ways:

* blocks of ``TOKEN_ROWS`` query tokens of a head, quantized per token;
* blocks of key tokens: the program sums its head's keys over all tokens (float32, from L2 after
  the first program), then writes its tokens' codes ``(k - mean) / scale`` and scales;
* blocks of ``VALUE_CHANNELS`` value channels: the channels' maximum over all tokens, then their
  codes in V's own ``[.., L, D]`` layout (contiguous along D, as the attention kernel loads them).

The arithmetic is the reference's step for step (``ops.quantize_per_token_ref``: ``scale =
max(amax, 1e-12) / qmax``, correctly rounded division, round half to even, NaN rows get NaN
scales); the keys' mean is a float32 sum in another order than torch's, so a key code may differ
from the reference's by one where a quotient lies within float32 rounding of a half.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.ir import ops
from qcompiler.runtimes.triton_common import as_bytes
from qcompiler.runtimes.triton_quantize import _nan_if, _to_code

TOKEN_ROWS = 256     # query or key tokens a program writes
VALUE_CHANNELS = 32  # value channels a program writes


@triton.jit
def _token_rows(src, dst, scale_ptr, bh, block, L, H, sb, sh, sn, qmax, D: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr, ROWS: tl.constexpr, SUBTRACT_MEAN: tl.constexpr, IS_FP8: tl.constexpr):
    """Tokens ``[block * ROWS, (block + 1) * ROWS)`` of head ``bh`` quantized per token, less the
    head's mean over all tokens when ``SUBTRACT_MEAN`` (the keys); codes ``[.., L, D]`` contiguous."""
    base = src + (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    mean = tl.zeros([BLOCK_D], dtype=tl.float32)
    if SUBTRACT_MEAN:
        for t0 in range(0, L, BLOCK_T):
            rt = t0 + tl.arange(0, BLOCK_T)
            x = tl.load(base + rt[:, None].to(tl.int64) * sn + rd[None, :], mask=(rt[:, None] < L) & d_ok[None, :],
                        other=0.0).to(tl.float32)
            mean += tl.sum(x, axis=0)
        mean = mean / L
    first = block * ROWS
    for t0 in range(first, tl.minimum(first + ROWS, L), BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt[:, None] < L) & d_ok[None, :]
        x = tl.load(base + rt[:, None].to(tl.int64) * sn + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, x - mean[None, :], 0.0)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), qmax)
        scale = _nan_if(tl.sum((x != x).to(tl.int32), axis=1) > 0, scale)
        row = bh.to(tl.int64) * L + rt
        tl.store(dst + row[:, None] * D + rd[None, :], _to_code(tl.math.div_rn(x, scale[:, None]), IS_FP8), mask=ok)
        tl.store(scale_ptr + row, scale, mask=rt < L)


@triton.jit
def _value_channels(src, dst, scale_ptr, bh, block, L, H, sb, sh, sn, qmax, D: tl.constexpr, BLOCK_T: tl.constexpr,
                    CHANNELS: tl.constexpr, IS_FP8: tl.constexpr):
    """Channels ``[block * CHANNELS, ..)`` of head ``bh`` quantized over all tokens (one scale per
    channel), the codes written in V's own ``[.., L, D]`` layout."""
    base = src + (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh
    rd = block * CHANNELS + tl.arange(0, CHANNELS)
    d_ok = rd < D
    amax = tl.zeros([CHANNELS], dtype=tl.float32)
    nans = tl.zeros([CHANNELS], dtype=tl.int32)
    for t0 in range(0, L, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        x = tl.load(base + rt[:, None].to(tl.int64) * sn + rd[None, :], mask=(rt[:, None] < L) & d_ok[None, :],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        nans += tl.sum((x != x).to(tl.int32), axis=0)
    scale = _nan_if(nans > 0, tl.math.div_rn(tl.maximum(amax, 1e-12), qmax))
    for t0 in range(0, L, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt[:, None] < L) & d_ok[None, :]
        x = tl.load(base + rt[:, None].to(tl.int64) * sn + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(dst + (bh.to(tl.int64) * L + rt[:, None]) * D + rd[None, :],
                 _to_code(tl.math.div_rn(x, scale[None, :]), IS_FP8), mask=ok)
    tl.store(scale_ptr + bh.to(tl.int64) * D + rd, scale, mask=d_ok)


@triton.jit
def _operands_kernel(q_ptr, k_ptr, v_ptr, qq_ptr, kq_ptr, vq_ptr, qs_ptr, ks_ptr, vs_ptr, LQ, LK, HQ, HKV,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, q_heads, kv_heads, q_blocks, k_blocks, v_blocks,
                     qk_max, v_max, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     ROWS: tl.constexpr, CHANNELS: tl.constexpr, V_FP8: tl.constexpr):
    """One launch for the three operands: the first programs take blocks of query tokens, the next
    blocks of key tokens (mean subtracted), the rest blocks of value channels."""
    pid = tl.program_id(0)
    n_q = q_heads * q_blocks
    n_k = kv_heads * k_blocks
    if pid < n_q:
        _token_rows(q_ptr, qq_ptr, qs_ptr, pid // q_blocks, pid % q_blocks, LQ, HQ, sqb, sqh, sqn, qk_max,
                    D, BLOCK_T, BLOCK_D, ROWS, False, False)
    elif pid < n_q + n_k:
        p = pid - n_q
        _token_rows(k_ptr, kq_ptr, ks_ptr, p // k_blocks, p % k_blocks, LK, HKV, skb, skh, skn, qk_max,
                    D, BLOCK_T, BLOCK_D, ROWS, True, False)
    else:
        p = pid - n_q - n_k
        _value_channels(v_ptr, vq_ptr, vs_ptr, p // v_blocks, p % v_blocks, LK, HKV, svb, svh, svn, v_max,
                        D, BLOCK_T, CHANNELS, V_FP8)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def quantize_operands(q: Tensor, k: Tensor, v: Tensor, qk_dtype: torch.dtype, v_dtype: torch.dtype) -> tuple:
    """``[B, H, L, D]`` query, key, value -> (Q codes, Q scales ``[B, Hq, Lq, 1]``, K codes, K scales
    ``[B, Hkv, Lk, 1]``, V codes, V scales ``[B, Hkv, D, 1]``), codes contiguous ``[B, H, L, D]``: Q per
    token, K less its mean over tokens per token, V per channel (module docstring), one launch."""
    (b, hq, lq, d), (hkv, lk) = q.shape, k.shape[1:3]
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    qq = torch.empty((b, hq, lq, d), dtype=qk_dtype, device=q.device)
    kq = torch.empty((b, hkv, lk, d), dtype=qk_dtype, device=q.device)
    vq = torch.empty((b, hkv, lk, d), dtype=v_dtype, device=q.device)
    sq = torch.empty((b, hq, lq, 1), dtype=torch.float32, device=q.device)
    sk = torch.empty((b, hkv, lk, 1), dtype=torch.float32, device=q.device)
    sv = torch.empty((b, hkv, d, 1), dtype=torch.float32, device=q.device)
    blocks = (triton.cdiv(lq, TOKEN_ROWS), triton.cdiv(lk, TOKEN_ROWS), triton.cdiv(d, VALUE_CHANNELS))
    programs = b * hq * blocks[0] + b * hkv * (blocks[1] + blocks[2])
    if programs and d:
        block_d = max(16, triton.next_power_of_2(d))
        _operands_kernel[(programs,)](
            q, k, v, as_bytes(qq), as_bytes(kq), as_bytes(vq), sq, sk, sv, lq, lk, hq, hkv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), b * hq, b * hkv, *blocks, ops.QMAXES[qk_dtype], ops.QMAXES[v_dtype],
            D=d, BLOCK_T=max(1, min(64, 8192 // block_d)), BLOCK_D=block_d, ROWS=TOKEN_ROWS, CHANNELS=VALUE_CHANNELS,
            V_FP8=v_dtype == ops.FP8)
    return qq, sq, kq, sk, vq, sv
