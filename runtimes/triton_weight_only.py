"""Weight-only linears in Triton: 16/32-bit activations x INT8 (W8A16) or packed INT4 (W4A16) weights.

Three paths (``path=``); the triton lowering measures them, with torch's built-ins, per shape and
keeps the fastest (``qcompiler.runtimes.linear_kernels``); called without ``path``, a launcher
takes ``gemv`` up to ``SMALL_M`` rows and ``dequant`` above:

* ``gemv``, M = 1 (decode, batch 1): a GEMV on the CUDA cores (``_gemv1_kernel``). The cost is
  reading the weight, so each program streams ``[BLOCK_N, BLOCK_K]`` tiles contiguous along K and
  reduces them against the activation vector (read once, contiguous, split into even and odd
  columns in registers); codes become floats by a bit trick instead of int-to-float conversions;
  INT4 group sums are scaled once per group.
* ``gemv``, M <= ``SMALL_M``: tensor-core tiles of 16 rows (``_gemv_kernel``): the integer codes go
  into the dot (exact in 16 bits) and each group's float32 sum is scaled, so the weight is never
  rounded to the activation dtype.
* ``gemm``: the same tiles over a grid of M tiles (``_gemm_kernel``), the weight dequantized in
  registers.
* ``dequant``: ``dequantize`` writes the weight in the activation dtype, exactly the reference's,
  in one kernel (each INT4 byte read once, its scale broadcast over its group in registers), and
  cuBLAS multiplies; it costs one transient weight's bytes.

With ``SPLIT_K > 1`` the GEMVs' partial sums meet in a float32 buffer by atomic adds (the split is
a named heuristic in ``triton_tuning``; ``split_k=1`` leaves the buffer, zero fill and cast out).
INT4 uses ``qcompiler.ir.int4``'s layout as is: codes two per byte (low nibble first), per-group
scales ``[N, G]``, per-group zero points or the symmetric 8; groups (powers of two) need not
divide K. AWQ's ``smooth_inv`` (when it was not folded upstream) multiplies the activation on
load. The references are ``qcompiler.ir.ops.linear_w8a16_ref`` and ``linear_w4a16_ref``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.ir import int4
from qcompiler.runtimes import triton_tuning as tuning
from qcompiler.runtimes.triton_common import byte_to_f32, cast_rounded, dot_acc, rows_2d, store_rounded, tile_ids
from qcompiler.runtimes.triton_support import interpreting

_ONE_GROUP = 1 << 30  # INT8 weights: one scale per row, i.e. one group as long as any K


@triton.jit
def _activation_tile(x_ptr, smooth_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    if HAS_SMOOTH:  # the reference's x * smooth_inv, in x's dtype
        s = tl.load(smooth_ptr + rk, mask=rk < K, other=0.0)
        x = cast_rounded(x.to(tl.float32) * s.to(tl.float32)[None, :], x.dtype)
    return x


@triton.jit
def _codes(byte_or_int8, zero, BITS: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Codes minus their zero point, as float32 (small integers: exact in any float type)."""
    if BITS == 4:
        c = byte_or_int8.to(tl.int32)
        if HAS_ZERO:
            c = c - zero.to(tl.int32)[None, :]
        else:
            c = c - 8
    else:
        c = byte_or_int8.to(tl.int32)
    return c.to(tl.float32)


@triton.jit
def _step(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, rm, rn, kk, M, N, K, K_W,
          stride_xm, stride_wn, stride_sn, stride_zn,
          BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, GROUP_SIZE: tl.constexpr,
          STEP: tl.constexpr, SCALE_IN_TILE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, acc):
    """``acc`` plus columns ``kk .. kk + STEP`` of ``x @ W.T`` (``STEP`` lies inside one group unless
    ``SCALE_IN_TILE``).

    INT4 bytes are read as a ``[STEP / 2, BLOCK_N]`` tile, contiguous along K: the low nibbles
    multiply the even activation columns and the high nibbles the odd ones, two dots and no
    shuffle. The dots take the integer codes (exact in 16 bits) and the group's scale multiplies
    their float32 sum, so the weight is never rounded to the activation dtype; only groups shorter
    than 32 (a dot needs K >= 16 per nibble half) scale each element in the tile, as the
    reference does. INT8 per-row scales are applied by the caller once, after the K loop.
    """
    n_ok = rn < N
    n_off = rn[None, :].to(tl.int64)
    if BITS == 4:
        half = tl.arange(0, STEP // 2)
        kb = kk // 2 + half  # byte column
        byte = tl.load(w_ptr + n_off * stride_wn + kb[:, None], mask=(kb[:, None] < K_W // 2) & n_ok[None, :], other=0)
        # groups past the weight's last (a step beyond K) are masked: their memory is not ours,
        # and a stray Inf scale times the zero activation there would make NaN
        n_groups = K_W // GROUP_SIZE
        g_tile = ((kk + 2 * half) // GROUP_SIZE)[:, None]
        g_ok = (g_tile < n_groups) & n_ok[None, :]
        g_step_ok = n_ok & (kk // GROUP_SIZE < n_groups)
        zero = rn
        if HAS_ZERO:
            if SCALE_IN_TILE:
                zero = tl.load(z_ptr + n_off * stride_zn + g_tile, mask=g_ok, other=0)
            else:
                zero = tl.load(z_ptr + rn.to(tl.int64) * stride_zn + kk // GROUP_SIZE, mask=g_step_ok, other=0)
        if SCALE_IN_TILE:  # zero is [STEP / 2, BLOCK_N] here: subtract it without broadcasting
            lo = (byte & 0xF).to(tl.int32)
            hi = (byte >> 4).to(tl.int32)
            if HAS_ZERO:
                lo = lo - zero.to(tl.int32)
                hi = hi - zero.to(tl.int32)
            else:
                lo = lo - 8
                hi = hi - 8
            sc = tl.load(s_ptr + n_off * stride_sn + g_tile, mask=g_ok, other=0.0)
            x_even = _activation_tile(x_ptr, smooth_ptr, rm, kk + 2 * half, M, K, stride_xm, HAS_SMOOTH)
            x_odd = _activation_tile(x_ptr, smooth_ptr, rm, kk + 2 * half + 1, M, K, stride_xm, HAS_SMOOTH)
            acc = dot_acc(x_even, cast_rounded(lo.to(tl.float32) * sc, x_even.dtype), acc, PRECISION, UPCAST)
            acc = dot_acc(x_odd, cast_rounded(hi.to(tl.float32) * sc, x_odd.dtype), acc, PRECISION, UPCAST)
        else:
            x_even = _activation_tile(x_ptr, smooth_ptr, rm, kk + 2 * half, M, K, stride_xm, HAS_SMOOTH)
            x_odd = _activation_tile(x_ptr, smooth_ptr, rm, kk + 2 * half + 1, M, K, stride_xm, HAS_SMOOTH)
            part = tl.zeros(acc.shape, dtype=tl.float32)
            part = dot_acc(x_even, _codes(byte & 0xF, zero, BITS, HAS_ZERO).to(x_even.dtype), part, PRECISION, UPCAST)
            part = dot_acc(x_odd, _codes(byte >> 4, zero, BITS, HAS_ZERO).to(x_odd.dtype), part, PRECISION, UPCAST)
            sc = tl.load(s_ptr + rn.to(tl.int64) * stride_sn + kk // GROUP_SIZE, mask=g_step_ok, other=0.0)
            acc += part * sc[None, :]
    else:
        rk = kk + tl.arange(0, STEP)
        q = tl.load(w_ptr + n_off * stride_wn + rk[:, None], mask=(rk[:, None] < K_W) & n_ok[None, :], other=0)
        x = _activation_tile(x_ptr, smooth_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
        acc = dot_acc(x, q.to(tl.float32).to(x.dtype), acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _k_range(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, rm, rn, k_start, k_end, M, N, K_W,
             stride_xm, stride_wn, stride_sn, stride_zn,
             BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, GROUP_SIZE: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_N]`` sum over K in ``[k_start, k_end)`` (INT8: before its row scale)."""
    SCALE_IN_TILE: tl.constexpr = BITS == 4 and GROUP_SIZE < 32
    # one group per step where the group fits in BLOCK_K; else BLOCK_K (a group holds several steps)
    STEP: tl.constexpr = BLOCK_K if (BITS == 8 or SCALE_IN_TILE or GROUP_SIZE > BLOCK_K) else GROUP_SIZE
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for j in tl.static_range(BLOCK_K // STEP):
            acc = _step(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, rm, rn, k0 + j * STEP, M, N, k_end, K_W,
                        stride_xm, stride_wn, stride_sn, stride_zn, BITS, HAS_ZERO, HAS_SMOOTH, GROUP_SIZE,
                        STEP, SCALE_IN_TILE, PRECISION, UPCAST, acc)
    if BITS == 8:
        acc = acc * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    return acc


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                    BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[N, K]`` = the reference's dequantized weight, ``((code - zero) * scale)`` rounded to out's dtype.

    INT4: each byte is read once (a contiguous ``[BLOCK_N, BLOCK_K / 2]`` tile), both nibbles are
    dequantized and interleaved back into column order in registers, so the stores are contiguous
    too; the scale (and zero point) of an element is its pair's, since a group never splits a byte."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_off = rn[:, None].to(tl.int64)
    if BITS == 4:
        # BLOCK_K and the group are powers of two: a tile holds G_TILE whole groups, or lies in one
        G_TILE: tl.constexpr = BLOCK_K // GROUP_SIZE if GROUP_SIZE < BLOCK_K else 1
        HALF: tl.constexpr = BLOCK_K // 2
        kb = tl.program_id(1) * HALF + tl.arange(0, HALF)  # byte column
        bmask = (rn[:, None] < N) & (2 * kb[None, :] < K)
        byte = tl.load(w_ptr + n_off * stride_wn + kb[None, :], mask=bmask, other=0).to(tl.int32)
        # one scale (and zero point) per row and group, broadcast over the group's bytes in registers
        g = (tl.program_id(1) * BLOCK_K) // GROUP_SIZE + tl.arange(0, G_TILE)
        gmask = (rn[:, None] < N) & (g[None, :] * GROUP_SIZE < K)
        sc = tl.load(s_ptr + n_off * stride_sn + g[None, :], mask=gmask, other=0.0)[:, :, None]
        if HAS_ZERO:
            z = tl.load(z_ptr + n_off * stride_zn + g[None, :], mask=gmask, other=0).to(tl.float32)[:, :, None]
        else:
            z = tl.full([BLOCK_N, G_TILE, 1], 8.0, tl.float32)
        byte = tl.reshape(byte, [BLOCK_N, G_TILE, HALF // G_TILE])
        lo = tl.reshape((byte_to_f32(byte & 0xF) - z) * sc, [BLOCK_N, HALF])
        hi = tl.reshape((byte_to_f32(byte >> 4) - z) * sc, [BLOCK_N, HALF])
        w = tl.interleave(lo, hi)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    else:
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + n_off * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0)
        w = (byte_to_f32(q.to(tl.int32) + 128) - 128.0) * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[:, None]
    store_rounded(out_ptr + n_off * stride_on + rk[None, :], w, (rn[:, None] < N) & (rk[None, :] < K))


@triton.jit
def _x_vector(x_ptr, smooth_ptr, rk, K, HAS_SMOOTH: tl.constexpr):
    """Activation entries ``rk`` of the single row, float32 (times ``1/s`` rounded as the reference)."""
    x = tl.load(x_ptr + rk, mask=rk < K, other=0.0)
    if HAS_SMOOTH:
        x = cast_rounded(x.to(tl.float32) * tl.load(smooth_ptr + rk, mask=rk < K, other=0.0).to(tl.float32), x.dtype)
    return x.to(tl.float32)


@triton.autotune(configs=tuning.weight_only_gemv1_configs(), key=tuning.AUTOTUNE_KEY, reset_to_zero=["acc_ptr"],
                 cache_results=True)
@triton.jit
def _gemv1_kernel(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, bias_ptr, y_ptr, acc_ptr, N, K, K_W, M_BUCKET,
                  stride_wn, stride_sn, stride_zn,
                  BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                  GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M = 1 (decode): no tensor cores. Each program streams a ``[BLOCK_N, BLOCK_K]`` weight tile per
    step, contiguous along K (16-byte loads), multiplies it by the activation vector on the CUDA
    cores and reduces along K; INT4 group sums are scaled per group: ``sum((code - z) * x) =
    sum(code * x) - z * sum(x)``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    n_off = rn.to(tl.int64)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    G_TILE: tl.constexpr = BLOCK_K // GROUP_SIZE if GROUP_SIZE < BLOCK_K else 1  # groups per step
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if BITS == 4:
            half = tl.arange(0, BLOCK_K // 2)
            kb = k0 // 2 + half
            byte = tl.load(w_ptr + n_off[:, None] * stride_wn + kb[None, :],
                           mask=n_ok[:, None] & (kb < K_W // 2)[None, :], other=0).to(tl.int32)
            # the activations once, contiguous, split into the even and odd columns in registers
            xv = _x_vector(x_ptr, smooth_ptr, k0 + tl.arange(0, BLOCK_K), k_end, HAS_SMOOTH)
            xe, xo = tl.split(tl.reshape(xv, [BLOCK_K // 2, 2]))
            t = byte_to_f32(byte & 0xF) * xe[None, :] + byte_to_f32(byte >> 4) * xo[None, :]
            t = tl.sum(tl.reshape(t, [BLOCK_N, G_TILE, BLOCK_K // 2 // G_TILE]), axis=2)
            xsum = tl.sum(tl.reshape(xe + xo, [G_TILE, BLOCK_K // 2 // G_TILE]), axis=1)
            g = k0 // GROUP_SIZE + tl.arange(0, G_TILE)
            g_ok = n_ok[:, None] & (g < K_W // GROUP_SIZE)[None, :]
            sc = tl.load(s_ptr + n_off[:, None] * stride_sn + g[None, :], mask=g_ok, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + n_off[:, None] * stride_zn + g[None, :], mask=g_ok, other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N, G_TILE], 8.0, tl.float32)
            acc += tl.sum((t - z * xsum[None, :]) * sc, axis=1)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_ptr + n_off[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & (rk < K_W)[None, :],
                        other=0)
            # signed code + 128 in [0, 255] converts like a nibble; the 128 comes back off the float
            qf = byte_to_f32((q.to(tl.int32) + 128)) - 128.0
            acc += tl.sum(qf * _x_vector(x_ptr, smooth_ptr, rk, k_end, HAS_SMOOTH)[None, :], axis=1)
    if BITS == 8:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        store_rounded(y_ptr + rn, acc, n_ok)
    else:
        tl.atomic_add(acc_ptr + rn, acc, mask=n_ok)


@triton.jit
def _tiled_kernel(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, bias_ptr, y_ptr, acc_ptr, M, N, K, K_W, M_BUCKET,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Tensor-core tiles ``[BLOCK_M, BLOCK_N]``: the codes go into the dots, dequantized in registers
    (the weight never goes to memory in the activation dtype). Grid: (N tiles, K splits, M tiles);
    one M tile for the decode GEMV (M <= 16), several for the fused GEMM."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = _k_range(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, rm, rn, k_start, k_end, M, N, K_W, stride_xm, stride_wn,
                   stride_sn, stride_zn, BITS, HAS_ZERO, HAS_SMOOTH, GROUP_SIZE, PRECISION, UPCAST,
                   BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        store_rounded(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc, mask)
    else:
        tl.atomic_add(acc_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask)


# the same kernel under two config sets: the decode GEMV (one 16-row tile) and the fused GEMM
_gemv_kernel = triton.autotune(configs=tuning.weight_only_gemv_configs(), key=tuning.AUTOTUNE_KEY,
                               reset_to_zero=["acc_ptr"], cache_results=True)(_tiled_kernel)
_gemm_kernel = triton.autotune(configs=tuning.weight_only_gemm_configs(), key=tuning.AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": tuning.prune_w8a8},
                               cache_results=True)(_tiled_kernel)


PATHS = ("gemv", "gemm", "dequant")  # what ``path=`` names; None picks by M (module docstring)


def _launch(x: Tensor, w: Tensor, scale: Tensor, zero: Optional[Tensor], smooth_inv: Optional[Tensor],
            bias: Optional[Tensor], n: int, bits: int, group_size: int, split_k: Optional[int],
            path: Optional[str] = None) -> Tensor:
    k = x.shape[-1]
    x2 = rows_2d(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    path = path or ("dequant" if m > tuning.SMALL_M else "gemv")
    if path not in PATHS or (path == "gemv" and m > tuning.SMALL_M):
        raise ValueError(f"weight-only path {path!r} cannot take M={m}: 'gemv' takes M <= {tuning.SMALL_M}; "
                         f"paths: {PATHS}")
    smooth = None if smooth_inv is None else smooth_inv.to(x.dtype).contiguous()
    scale = scale.to(torch.float32).contiguous()
    if path == "dequant":  # the weight in x's dtype (exactly the reference's), then cuBLAS
        w_deq = dequantize(w, scale, zero, n, k, bits, group_size, x.dtype)
        xs = x2 if smooth is None else x2 * smooth
        return torch.nn.functional.linear(xs, w_deq, None if bias is None else bias.to(x.dtype)).reshape(*x.shape[:-1], n)
    args = dict(x_ptr=x2, w_ptr=w, s_ptr=scale, z_ptr=zero if zero is not None else w,
                smooth_ptr=smooth if smooth is not None else x2, bias_ptr=bias.contiguous() if bias is not None else x2,
                y_ptr=y, M=m, N=n, K=k, K_W=w.shape[1] * (2 if bits == 4 else 1), M_BUCKET=tuning.m_bucket(m),
                stride_xm=x2.stride(0), stride_wn=w.stride(0),
                stride_sn=scale.stride(0), stride_zn=zero.stride(0) if zero is not None else 0, stride_ym=y.stride(0),
                BITS=bits, HAS_ZERO=zero is not None, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None,
                GROUP_SIZE=group_size, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                UPCAST=interpreting() and x.dtype == torch.bfloat16)
    if path == "gemm":
        _gemm_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), 1, triton.cdiv(m, meta["BLOCK_M"]))](
            acc_ptr=y, SPLIT_K=1, **args)
        return y.reshape(*x.shape[:-1], n)
    if m == 1:  # the CUDA-core GEMV takes neither M nor the tensor-core options
        kernel = _gemv1_kernel
        args = {name: v for name, v in args.items() if name not in ("M", "stride_xm", "stride_ym", "PRECISION", "UPCAST")}
        grid = lambda split: lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    else:
        kernel = _gemv_kernel
        grid = lambda split: lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split, 1)  # noqa: E731
    split = split_k or tuning.gemv_split_k(n, k, tuning.sm_count(x.device))
    acc = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    kernel[grid(split)](acc_ptr=acc, SPLIT_K=split, **args)
    if split > 1:
        y.copy_(acc)  # float32 -> x.dtype, rounded to nearest even
    return y.reshape(*x.shape[:-1], n)


def dequantize(w: Tensor, scale: Tensor, zero: Optional[Tensor], n: int, k: int, bits: int, group_size: int,
               dtype: torch.dtype) -> Tensor:
    """The weight ``[N, K]`` in ``dtype``, as the reference ops dequantize it, in one kernel."""
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    scale = scale.to(torch.float32).contiguous()
    bn, bk = tuning.DEQUANT_BLOCK
    _dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w, scale, zero if zero is not None else w, out, n, k, w.stride(0), scale.stride(0),
        zero.stride(0) if zero is not None else 0, out.stride(0), BITS=bits, HAS_ZERO=zero is not None,
        GROUP_SIZE=group_size, BLOCK_N=bn, BLOCK_K=bk)
    return out


def _check_activation(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} takes float32, bfloat16 or float16 activations, got {x.dtype}")


def linear_w8a16(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 split_k: Optional[int] = None, path: Optional[str] = None) -> Tensor:
    """The ``linear_w8a16`` q-op on Triton: x ``[..., K]`` x INT8 ``[N, K]`` (per-row scales) -> ``[..., N]``."""
    _check_activation(x, "linear_w8a16")
    if wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] != x.shape[-1] or w_scale.shape != (wq.shape[0],):
        raise ValueError(f"linear_w8a16: weight {wq.dtype} {tuple(wq.shape)} with scale {tuple(w_scale.shape)} does "
                         f"not fit activation [..., {x.shape[-1]}]; expected int8 [N, K] and scale [N]")
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    return _launch(x, wq, w_scale, None, None, bias, wq.shape[0], 8, _ONE_GROUP, split_k, path)


def linear_w4a16(x: Tensor, packed: Tensor, scale: Tensor, zero: Optional[Tensor], smooth_inv: Optional[Tensor],
                 group_size: int, bias: Optional[Tensor], split_k: Optional[int] = None,
                 path: Optional[str] = None) -> Tensor:
    """The ``linear_w4a16`` q-op on Triton, on ``qcompiler.ir.int4``'s packed layout."""
    _check_activation(x, "linear_w4a16")
    k = x.shape[-1]
    g = int4.groups(k, group_size)
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape != (n, g * group_size // 2) or scale.shape != (n, g):
        raise ValueError(f"linear_w4a16: packed {packed.dtype} {tuple(packed.shape)}, scale {tuple(scale.shape)} do not "
                         f"fit K={k} at group {group_size}; expected uint8 [N, {g * group_size // 2}] and scale [N, {g}]")
    if zero is not None and zero.shape != (n, g):
        raise ValueError(f"linear_w4a16: zero points {tuple(zero.shape)}; expected [N, {g}] (or None when symmetric)")
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"linear_w4a16: group size {group_size} must be a power of two (the kernels step through K "
                         "by whole groups); quantize with group_size 32, 64 or 128")
    return _launch(x, packed.contiguous(), scale, None if zero is None else zero.contiguous(), smooth_inv, bias, n,
                   4, group_size, split_k, path)
