"""Activation quantization in one Triton kernel: SmoothQuant ``1/s``, per-token amax, INT8 / FP8 out.

Eager torch spends five kernels on this (multiply, abs, amax, divide, round/clamp/cast); here each
program reads a row once (twice when a row exceeds ``MAX_ONE_TILE`` elements, the second read
from L2), writes the 8-bit row and its float32 scale. The arithmetic is the reference op's
(``qcompiler.ir.ops.quantize_per_token_ref`` / ``quantize_per_tensor_ref``) step for step: float32
smoothing, ``scale = max(amax, 1e-12) / qmax`` and ``x / scale`` with correctly rounded division
(``div_rn``: Triton's default float32 ``/`` on the GPU is approximate), round half to even,
so the codes are bit-identical to the reference's (tested).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.ir import ops
from qcompiler.runtimes.triton_common import as_bytes, rows_2d

MAX_ONE_TILE = 16384  # row length kept in registers in a single tile (11008 for Llama's down_proj)


@triton.jit
def _round_to_e4m3(y):
    """Round float32 ``|y| <= 448`` to the nearest E4M3 value, ties to even, in float32.

    The cast below then only converts exact values: Triton's interpreter rounds float32 -> fp8
    wrongly where rounding carries into the exponent (126.8 -> 64), and doing the rounding here
    keeps the GPU and the interpreter on the same arithmetic.
    """
    bits = y.to(tl.int32, bitcast=True)
    # normal range (|y| >= 2**-6): keep 3 mantissa bits; the integer carry moves the exponent
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -0x100000).to(tl.float32, bitcast=True)
    # subnormal range: multiples of 2**-9; (|y| + 1.5 * 2**14) - 1.5 * 2**14 rounds to them, and
    # the sign goes back on by its bit (a tiny negative value is -0.0, as torch's cast makes it)
    magnitude = (tl.abs(y) + 24576.0) - 24576.0
    subnormal = (magnitude.to(tl.int32, bitcast=True) | (bits & -0x80000000)).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def _to_code(y, IS_FP8: tl.constexpr):
    """The reference's ``_round_clamp``: FP8 clamps then casts; INT8 rounds then clamps.

    One return after an if/else: the compiler (not the interpreter) rejects a constexpr branch
    that returns a different type than the code after it."""
    if IS_FP8:
        # nearest even, as torch's cast; stored as its byte (see triton_common.as_bytes)
        y = _round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
        code = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    else:
        # (y + 1.5 * 2**23) - 1.5 * 2**23 rounds half to even for |y| < 2**22; beyond, it stays
        # far outside [-128, 127] and the clamp saturates it as the reference does
        r = (y + 12582912.0) - 12582912.0
        code = tl.minimum(tl.maximum(r, -128.0), 127.0).to(tl.int8)
    return code


@triton.jit
def _smoothed(x_row, smooth_ptr, cols, K, HAS_SMOOTH: tl.constexpr):
    """Columns ``cols`` of a row in float32, times ``1/s`` (the reference's ``_apply_smooth``)."""
    mask = cols < K
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(smooth_ptr + cols, mask=mask, other=0.0)
    return x


@triton.jit
def _nan_if(flag, scale):
    """NaN for a row that holds a NaN, as the reference's amax gives (``maximum`` on the GPU drops
    NaN operands, which would quantize the row to finite codes)."""
    return tl.where(flag, float("nan"), scale)


@triton.jit
def _per_token_kernel(x_ptr, smooth_ptr, q_ptr, scale_ptr, K, stride_x, stride_q, qmax,
                      HAS_SMOOTH: tl.constexpr, IS_FP8: tl.constexpr, BLOCK_K: tl.constexpr,
                      ONE_TILE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    if ONE_TILE:
        cols = tl.arange(0, BLOCK_K)
        x = _smoothed(x_row, smooth_ptr, cols, K, HAS_SMOOTH)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12), qmax)
        scale = _nan_if(tl.sum((x != x).to(tl.int32), axis=0) > 0, scale)
        tl.store(q_row + cols, _to_code(tl.math.div_rn(x, scale), IS_FP8), mask=cols < K)
    else:
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        nans = tl.zeros([BLOCK_K], dtype=tl.int32)
        for start in range(0, K, BLOCK_K):
            x = _smoothed(x_row, smooth_ptr, start + tl.arange(0, BLOCK_K), K, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.abs(x))
            nans += (x != x).to(tl.int32)
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-12), qmax)
        scale = _nan_if(tl.sum(nans, axis=0) > 0, scale)
        for start in range(0, K, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = _smoothed(x_row, smooth_ptr, cols, K, HAS_SMOOTH)
            tl.store(q_row + cols, _to_code(tl.math.div_rn(x, scale), IS_FP8), mask=cols < K)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _per_tensor_kernel(x_ptr, smooth_ptr, scale_ptr, q_ptr, K, stride_x, stride_q,
                       HAS_SMOOTH: tl.constexpr, IS_FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        x = _smoothed(x_ptr + row * stride_x, smooth_ptr, cols, K, HAS_SMOOTH)
        tl.store(q_ptr + row * stride_q + cols, _to_code(tl.math.div_rn(x, scale), IS_FP8), mask=cols < K)


def _smooth(smooth_inv: Optional[Tensor], k: int, x: Tensor) -> Optional[Tensor]:
    if smooth_inv is None:
        return None
    if smooth_inv.shape != (k,):
        raise ValueError(f"smooth_inv has shape {tuple(smooth_inv.shape)}; expected ({k},), one factor per input feature")
    return smooth_inv.to(device=x.device, dtype=torch.float32).contiguous()


def _block_k(k: int) -> tuple[int, bool]:
    one_tile = k <= MAX_ONE_TILE
    return (triton.next_power_of_2(k) if one_tile else 4096), one_tile


def quantize_per_token(x: Tensor, smooth_inv: Optional[Tensor] = None,
                       qdtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """The ``quantize_per_token`` q-op: (``qdtype`` like x, float32 scale ``x.shape[:-1] + (1,)``)."""
    k = x.shape[-1]
    rows = rows_2d(x)
    q = torch.empty(rows.shape, dtype=qdtype, device=x.device)
    scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device)
    smooth = _smooth(smooth_inv, k, x)
    block_k, one_tile = _block_k(k)
    if rows.shape[0]:
        _per_token_kernel[(rows.shape[0],)](
            rows, smooth if smooth is not None else rows, as_bytes(q), scale, k, rows.stride(0), q.stride(0),
            ops.QMAXES[qdtype], HAS_SMOOTH=smooth is not None, IS_FP8=qdtype == ops.FP8, BLOCK_K=block_k,
            ONE_TILE=one_tile, num_warps=8 if block_k >= 4096 else 4)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


def quantize_per_tensor(x: Tensor, scale: Tensor, smooth_inv: Optional[Tensor] = None,
                        qdtype: torch.dtype = torch.int8) -> Tensor:
    """The ``quantize_per_tensor`` q-op with a calibrated 0-d float32 ``scale``."""
    k = x.shape[-1]
    rows = rows_2d(x)
    q = torch.empty(rows.shape, dtype=qdtype, device=x.device)
    smooth = _smooth(smooth_inv, k, x)
    block_k = min(triton.next_power_of_2(k), 4096)
    if rows.shape[0]:
        _per_tensor_kernel[(rows.shape[0],)](
            rows, smooth if smooth is not None else rows, scale.to(device=x.device, dtype=torch.float32),
            as_bytes(q), k, rows.stride(0), q.stride(0),
            HAS_SMOOTH=smooth is not None, IS_FP8=qdtype == ops.FP8, BLOCK_K=block_k)
    return q.reshape(x.shape)
