"""Weight-only linears in Triton on weights re-packed once at compile time: codes in int32 words, K-major.

The triton lowering's kernel plan calls ``prepare_w4`` / ``prepare_w8`` once per weight (a
``Kernel.prepare`` of ``runtimes.linear_kernels``) and the launchers below per call. The packed
layout is GemLite's: ``words[K / P, N]`` int32 with ``P = 32 / bits`` consecutive codes of one
output column in each word (code ``j`` in bits ``j * bits ...``), INT4 scales and zero points as
``[G, N]`` float32. A tile of words is contiguous along N, so a warp's loads are coalesced and
every byte of the weight is read once per tile. For INT4 the words are qcompile's own bytes
(``qcompiler.ir.int4``: two codes per byte, low nibble first) read four at a time, transposed.

* ``gemm`` (INT4, any M, tensor cores): each ``[BLOCK_K / 8, BLOCK_N]`` tile of words is loaded
  once and spread over its codes in registers; a code is dequantized to the reference's weight
  (``(code - zero) * scale`` rounded to the activation's dtype) by two shifts, an and-or and one
  multiply-add (the float32 value can differ from the reference's product in its last bit, so a
  bf16 weight on a rounding tie may round the other way) and multiplied with ``tl.dot``; no
  weight in the activation dtype ever goes to memory, so at M = 16 to a few hundred rows the
  kernel moves a quarter of the bytes cuBLAS moves for bf16. (INT8 weights are not packed for
  the GEMM: read as stored they cost fewer instructions, ``triton_weight_only``.)
* ``gemv`` (M = 1, CUDA cores): a code becomes a float in one shift and one and-or, the code
  placed in the top bits of the mantissa of 1.0 (``1 + code / 2**bits``, no int-to-float
  conversion, no subtraction), multiplied into the activation and summed; the per-group
  ``scale`` and ``zero`` (INT8: the row scale) are applied once per group to the sums:
  ``sum((c - z) x) = 2**b * sum(v x) - (2**b + z) * sum(x)``. No split of K, so no float32
  buffer, zero fill, atomics or cast kernel.

References: ``qcompiler.ir.ops.linear_w4a16_ref`` and ``linear_w8a16_ref``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.runtimes import triton_tuning as tuning
from qcompiler.runtimes.triton_common import cast_rounded, dot_acc, rows_2d, store_rounded, tile_ids
from qcompiler.runtimes.triton_support import interpreting
from qcompiler.runtimes.triton_weight_only import _activation_tile, _x_vector

ONE_BITS = 0x3F800000  # float32 1.0


def packable(bits: int, k_w: int, group_size: int) -> tuple:
    """``(ok, reason)``: whether a weight of ``k_w`` (padded) columns packs into whole words."""
    per = 32 // bits
    if bits == 4 and group_size < per:
        return False, f"packed words hold {per} INT4 codes of one group; groups of {group_size} are smaller"
    if k_w % per:
        return False, f"K={k_w} is not a multiple of {per} (codes per int32 word)"
    return True, ""


def prepare_w4(packed: Tensor, scale: Tensor, zero: Optional[Tensor]) -> tuple:
    """qcompile's INT4 weight -> ``(words [K_W / 8, N] int32, scale [G, N] f32[, zero [G, N] f32])``."""
    words = packed.contiguous().view(torch.int32).t().contiguous()
    out = (words, scale.to(torch.float32).t().contiguous())
    return out if zero is None else (*out, zero.to(torch.float32).t().contiguous())


def prepare_w8(wq: Tensor, w_scale: Tensor) -> tuple:
    """INT8 ``[N, K]`` -> ``(words [K / 4, N] int32 of the codes + 128, scale [N] f32)``: each byte
    holds ``code + 128`` in [0, 255] (the sign bit flipped once here, not per call)."""
    words = (wq.contiguous().view(torch.uint8) ^ 0x80).view(torch.int32)
    return words.t().contiguous(), w_scale.to(torch.float32).contiguous()


@triton.jit
def _unit_float(words, J: tl.constexpr, BITS: tl.constexpr, one_bits):
    """Code ``J`` of each word as the float32 ``1 + code / 2**BITS`` (INT8: the code + 128): the field
    moved into the top of the mantissa of 1.0 by one shift, then one and-or with ``one_bits`` (1.0's
    bits, 0x3F800000, a run-time argument: held in a register, the and-or compiles to one LOP3
    instead of an AND and an OR with two immediates)."""
    TOP: tl.constexpr = 23 - BITS  # the field's lowest bit in the mantissa
    LOW: tl.constexpr = J * BITS
    if LOW <= TOP:
        f = words << (TOP - LOW)
    else:
        f = words >> (LOW - TOP)
    FIELD: tl.constexpr = ((1 << BITS) - 1) << TOP
    return ((f & FIELD) | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _unit_float_rows(words, shift, BITS: tl.constexpr, one_bits):
    """``_unit_float`` with the field's position a tensor (``shift``: the field's lowest bit, per
    code): shifted down to bit 0 and up to the mantissa's top, then the one and-or (a rotate by a
    varying amount compiled to two shifts and an extra OR)."""
    u = words.to(tl.uint32, bitcast=True)
    f = ((u >> shift) << (23 - BITS)).to(tl.int32, bitcast=True)
    FIELD: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    return ((f & FIELD) | one_bits).to(tl.float32, bitcast=True)


@triton.autotune(configs=tuning.packed_gemv_configs(), key=tuning.AUTOTUNE_KEY, cache_results=True)
@triton.jit
def _gemv_packed_kernel(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, bias_ptr, y_ptr, N, K, K_W, M_BUCKET, one_bits,
                        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                        HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """M = 1: a program owns ``BLOCK_N`` outputs and walks all of K, ``BLOCK_K / P`` words a column a step."""
    PER: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // PER
    UNIT: tl.constexpr = 16.0 if BITS == 4 else 256.0
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    ri = tl.arange(0, ROWS)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        wi = k0 // PER + ri
        words = tl.load(w_ptr + wi[:, None].to(tl.int64) * N + rn[None, :],
                        mask=(wi < K_W // PER)[:, None] & n_ok[None, :], other=0)
        # the activations of a word's codes: one contiguous [ROWS, PER] load, split into PER
        # columns in registers (a load per code position would cost a load per multiply-add)
        xw = _x_vector(x_ptr, smooth_ptr, (k0 + ri * PER)[:, None] + tl.arange(0, PER)[None, :], K, HAS_SMOOTH)
        t = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        if BITS == 4:
            a, b = tl.split(tl.reshape(xw, [ROWS, 2, 2, 2]))  # code j = 4p + 2q + r: split by r, q, p
            x0, x4 = tl.split(tl.split(a)[0])
            x2, x6 = tl.split(tl.split(a)[1])
            x1, x5 = tl.split(tl.split(b)[0])
            x3, x7 = tl.split(tl.split(b)[1])
            t += _unit_float(words, 0, BITS, one_bits) * x0[:, None]  # one fused multiply-add each
            t += _unit_float(words, 1, BITS, one_bits) * x1[:, None]
            t += _unit_float(words, 2, BITS, one_bits) * x2[:, None]
            t += _unit_float(words, 3, BITS, one_bits) * x3[:, None]
            t += _unit_float(words, 4, BITS, one_bits) * x4[:, None]
            t += _unit_float(words, 5, BITS, one_bits) * x5[:, None]
            t += _unit_float(words, 6, BITS, one_bits) * x6[:, None]
            t += _unit_float(words, 7, BITS, one_bits) * x7[:, None]
        else:
            a, b = tl.split(tl.reshape(xw, [ROWS, 2, 2]))  # byte j = 2q + r
            x0, x2 = tl.split(a)
            x1, x3 = tl.split(b)
            t += _unit_float(words, 0, BITS, one_bits) * x0[:, None]
            t += _unit_float(words, 1, BITS, one_bits) * x1[:, None]
            t += _unit_float(words, 2, BITS, one_bits) * x2[:, None]
            t += _unit_float(words, 3, BITS, one_bits) * x3[:, None]
        xrow = tl.sum(xw, axis=1)
        if BITS == 4:
            # groups are whole words; a step holds G_TILE groups, or lies inside one
            G_TILE: tl.constexpr = BLOCK_K // GROUP_SIZE if GROUP_SIZE < BLOCK_K else 1
            tg = tl.sum(tl.reshape(t, [G_TILE, ROWS // G_TILE, BLOCK_N]), axis=1)
            xg = tl.sum(tl.reshape(xrow, [G_TILE, ROWS // G_TILE]), axis=1)
            g = k0 // GROUP_SIZE + tl.arange(0, G_TILE)
            g_ok = (g < K_W // GROUP_SIZE)[:, None] & n_ok[None, :]
            at = g[:, None].to(tl.int64) * N + rn[None, :]
            sc = tl.load(s_ptr + at, mask=g_ok, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + at, mask=g_ok, other=0.0)
            else:
                z = tl.full([G_TILE, BLOCK_N], 8.0, tl.float32)
            acc += tl.sum((UNIT * tg - (UNIT + z) * xg[:, None]) * sc, axis=0)
        else:  # v = 1 + (code + 128) / 256
            acc += tl.sum(UNIT * t, axis=0) - (UNIT + 128.0) * tl.sum(xrow, axis=0)
    if BITS == 8:
        acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    store_rounded(y_ptr + rn, acc, n_ok)


@triton.autotune(configs=tuning.packed_gemm_configs(), key=tuning.AUTOTUNE_KEY, cache_results=True,
                 prune_configs_by={"early_config_prune": tuning.prune_w8a8})
@triton.jit
def _gemm_packed_kernel(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, bias_ptr, y_ptr, M, N, K, K_W, M_BUCKET,
                        stride_xm, stride_ym, one_bits,
                        BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """INT4 (``BITS`` 4 only) on tensor-core tiles; each weight tile dequantized in registers to the
    reference's weight: a code as ``v = 1 + code / 16`` (``_unit_float_rows``), then ``(code - zero)
    * scale = v * 16 scale - (16 + zero) * scale``, one multiply-add with the group's two factors
    (made once per group row of the tile)."""
    PER: tl.constexpr = 32 // BITS
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    UNIT: tl.constexpr = 16.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = _activation_tile(x_ptr, smooth_ptr, rm, kk, M, K, stride_xm, HAS_SMOOTH)
        # each word loaded once ([BLOCK_K / PER, BLOCK_N]: what the pipeline stages in shared
        # memory) and spread over its PER rows in registers; loading it once per row (L1 hits)
        # staged PER times the bytes and cost more instructions (sm90_decode_kernels_sass.md)
        wi = k0 // PER + tl.arange(0, BLOCK_K // PER)
        words = tl.load(w_ptr + wi[:, None].to(tl.int64) * N + rn[None, :],
                        mask=(wi < K_W // PER)[:, None] & n_ok[None, :], other=0)
        w3 = tl.broadcast_to(words[:, None, :], [BLOCK_K // PER, PER, BLOCK_N])
        sh3 = (tl.arange(0, PER) * BITS)[None, :, None].to(tl.uint32)
        v = tl.reshape(_unit_float_rows(w3, sh3, BITS, one_bits), [BLOCK_K, BLOCK_N])
        # one row of scales (and zero points) per group in the tile, broadcast over the group in
        # registers: a [BLOCK_K, BLOCK_N] float32 scale tile would triple the shared memory
        G_TILE: tl.constexpr = BLOCK_K // GROUP_SIZE if GROUP_SIZE < BLOCK_K else 1
        g = k0 // GROUP_SIZE + tl.arange(0, G_TILE)
        at = g[:, None].to(tl.int64) * N + rn[None, :]
        g_ok = n_ok[None, :] & (g < K_W // GROUP_SIZE)[:, None]
        sc = tl.load(s_ptr + at, mask=g_ok, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + at, mask=g_ok, other=0.0)
        else:
            z = 8.0
        v3 = tl.reshape(v, [G_TILE, BLOCK_K // G_TILE, BLOCK_N])
        wf = tl.reshape(v3 * (UNIT * sc)[:, None, :] - ((UNIT + z) * sc)[:, None, :], [BLOCK_K, BLOCK_N])
        if UPCAST:  # the interpreter: round to bf16 explicitly (its cast truncates)
            w = cast_rounded(wf, x.dtype)
        else:
            w = wf.to(x.dtype)
        acc = dot_acc(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc, (rm[:, None] < M) & n_ok[None, :])


PATHS = ("gemv", "gemm")


def linear_packed(x: Tensor, words: Tensor, scale: Tensor, zero: Optional[Tensor], smooth_inv: Optional[Tensor],
                  bias: Optional[Tensor], n: int, bits: int, group_size: int, path: str) -> Tensor:
    """``linear_w4a16`` (bits 4) or ``linear_w8a16`` (bits 8) on prepared words: x ``[..., K]`` -> ``[..., N]``."""
    if path not in PATHS:
        raise ValueError(f"packed weight-only path {path!r}; paths: {PATHS}")
    k = x.shape[-1]
    x2 = rows_2d(x)
    m = x2.shape[0]
    if path == "gemv" and m != 1:
        raise ValueError(f"the packed GEMV takes one row, not M={m}; use path 'gemm'")
    if path == "gemm" and bits != 4:
        raise ValueError("the packed GEMM takes INT4 words; INT8 weights are byte-addressable as stored, and "
                         "triton_weight_only's GEMM spends fewer instructions per weight element on them "
                         "(docs/results/sm90_decode_kernels_sass.md)")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    k_w = words.shape[0] * (32 // bits)
    smooth = None if smooth_inv is None else smooth_inv.to(x.dtype).contiguous()
    args = dict(x_ptr=x2, w_ptr=words, s_ptr=scale, z_ptr=zero if zero is not None else scale,
                smooth_ptr=smooth if smooth is not None else x2, bias_ptr=bias.contiguous() if bias is not None else x2,
                y_ptr=y, N=n, K=k, K_W=k_w, M_BUCKET=tuning.m_bucket(m), BITS=bits, HAS_ZERO=zero is not None,
                HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None,
                GROUP_SIZE=group_size if bits == 4 else 1 << 30)
    if path == "gemv":
        _gemv_packed_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](one_bits=ONE_BITS, **args)
    else:
        _gemm_packed_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            M=m, stride_xm=x2.stride(0), stride_ym=y.stride(0), one_bits=ONE_BITS,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            UPCAST=interpreting() and x.dtype == torch.bfloat16, **args)
    return y.reshape(*x.shape[:-1], n)
