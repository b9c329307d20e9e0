"""The 8-bit attention's key and value operands, each in one Triton kernel, in the layout its kernel reads.

``qcompile::attention_q8`` (``qcompiler.ir.attention``) quantizes K per token after subtracting
its mean over tokens, and V per channel (one scale per channel over all tokens). Done with torch
ops and the per-token kernel, that is a float32 copy of K, its mean, the subtraction, a transposed
copy of V, two quantize passes and a transpose back that leaves V's codes strided along the head
dimension for the attention kernel. Here:

* ``smoothed_keys``: one kernel, grid (batch x KV head, blocks of ``KEY_ROWS`` tokens); a program
  sums its head's keys over all tokens (float32, read from L2 after the first program), then
  writes its tokens' codes ``(k - mean) / scale`` and per-token scales;
* ``values_per_channel``: one kernel, grid (batch x KV head, blocks of channels); a program takes
  its channels' maximum over all tokens, then writes their codes in V's own ``[.., L, D]``
  layout (contiguous along D, as the attention kernel loads them).

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

KEY_ROWS = 256      # tokens a program of the keys' kernel writes
VALUE_CHANNELS = 32  # channels a program of the values' kernel writes


@triton.jit
def _keys_kernel(k_ptr, q_ptr, scale_ptr, L, HKV, skb, skh, skn, qmax,
                 D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
                 IS_FP8: tl.constexpr):
    bh = tl.program_id(0)
    base = k_ptr + (bh // HKV).to(tl.int64) * skb + (bh % HKV).to(tl.int64) * skh
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t0 in range(0, L, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        x = tl.load(base + rt[:, None].to(tl.int64) * skn + rd[None, :], mask=(rt[:, None] < L) & d_ok[None, :],
                    other=0.0).to(tl.float32)
        total += tl.sum(x, axis=0)
    mean = total / L
    first = tl.program_id(1) * ROWS
    for t0 in range(first, tl.minimum(first + ROWS, L), BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt[:, None] < L) & d_ok[None, :]
        x = tl.load(base + rt[:, None].to(tl.int64) * skn + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.where(ok, x - mean[None, :], 0.0)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12), qmax)
        scale = _nan_if(tl.sum((x != x).to(tl.int32), axis=1) > 0, scale)
        row = bh.to(tl.int64) * L + rt
        tl.store(q_ptr + row[:, None] * D + rd[None, :], _to_code(tl.math.div_rn(x, scale[:, None]), IS_FP8), mask=ok)
        tl.store(scale_ptr + row, scale, mask=rt < L)


@triton.jit
def _values_kernel(v_ptr, q_ptr, scale_ptr, L, HKV, svb, svh, svn, qmax,
                   D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr):
    bh = tl.program_id(0)
    base = v_ptr + (bh // HKV).to(tl.int64) * svb + (bh % HKV).to(tl.int64) * svh
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = rd < D
    amax = tl.zeros([BLOCK_D], dtype=tl.float32)
    nans = tl.zeros([BLOCK_D], dtype=tl.int32)
    for t0 in range(0, L, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        x = tl.load(base + rt[:, None].to(tl.int64) * svn + rd[None, :], mask=(rt[:, None] < L) & d_ok[None, :],
                    other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
        nans += tl.sum((x != x).to(tl.int32), axis=0)
    scale = _nan_if(nans > 0, tl.math.div_rn(tl.maximum(amax, 1e-12), qmax))
    for t0 in range(0, L, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ok = (rt[:, None] < L) & d_ok[None, :]
        x = tl.load(base + rt[:, None].to(tl.int64) * svn + rd[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(q_ptr + (bh.to(tl.int64) * L + rt[:, None]) * D + rd[None, :],
                 _to_code(tl.math.div_rn(x, scale[None, :]), IS_FP8), mask=ok)
    tl.store(scale_ptr + bh.to(tl.int64) * D + rd, scale, mask=d_ok)


def _unit_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def smoothed_keys(k: Tensor, qdtype: torch.dtype) -> tuple:
    """``k`` ``[B, H, L, D]`` -> (codes ``[B, H, L, D]`` contiguous, float32 scales ``[B, H, L, 1]``)
    of ``quantize_per_token(k - k.mean(over tokens))``."""
    b, h, n, d = k.shape
    k = _unit_stride(k)
    codes = torch.empty((b, h, n, d), dtype=qdtype, device=k.device)
    scales = torch.empty((b, h, n, 1), dtype=torch.float32, device=k.device)
    if codes.numel():
        block_d = max(16, triton.next_power_of_2(d))
        _keys_kernel[(b * h, triton.cdiv(n, KEY_ROWS))](
            k, as_bytes(codes), scales, n, h, k.stride(0), k.stride(1), k.stride(2), ops.QMAXES[qdtype],
            D=d, BLOCK_T=max(1, min(64, 8192 // block_d)), BLOCK_D=block_d, ROWS=KEY_ROWS, IS_FP8=qdtype == ops.FP8)
    return codes, scales


def values_per_channel(v: Tensor, qdtype: torch.dtype) -> tuple:
    """``v`` ``[B, H, L, D]`` -> (codes ``[B, H, L, D]`` contiguous, float32 scales ``[B, H, D, 1]``)
    of ``quantize_per_token(v^T)`` (one scale per channel), without a transposed copy."""
    b, h, n, d = v.shape
    v = _unit_stride(v)
    codes = torch.empty((b, h, n, d), dtype=qdtype, device=v.device)
    scales = torch.empty((b, h, d, 1), dtype=torch.float32, device=v.device)
    if codes.numel():
        _values_kernel[(b * h, triton.cdiv(d, VALUE_CHANNELS))](
            v, as_bytes(codes), scales, n, h, v.stride(0), v.stride(1), v.stride(2), ops.QMAXES[qdtype],
            D=d, BLOCK_T=64, BLOCK_D=VALUE_CHANNELS, IS_FP8=qdtype == ops.FP8)
    return codes, scales
