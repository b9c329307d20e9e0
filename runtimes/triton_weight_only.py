"""Weight-only GEMMs in Triton: 16/32-bit activations x INT8 (W8A16) or packed INT4 (W4A16) weights.

The weight tile is dequantized in registers exactly as the reference ops do it (``(code - zero) *
scale`` in float32, rounded to the activation dtype), then multiplied on the tensor cores with a
float32 accumulator. Two kernels per bit width, picked per call by M:

* ``M <= SMALL_M`` (decode): a split-K GEMV. The cost is reading the weight, so each program
  streams a ``[BLOCK_N, K / SPLIT_K]`` slice; with ``SPLIT_K > 1`` the partial sums meet in a float32
  buffer by atomic adds (the split is a named heuristic in ``triton_tuning``).
* larger M (prefill): a tiled GEMM with grouped tile order.

INT4 uses ``qcompiler.int4``'s layout as is: codes two per byte (low nibble first), per-group
scales ``[N, G]``, per-group zero points or the symmetric 8; groups need not divide K. AWQ's
``smooth_inv`` (when it was not folded upstream) multiplies the activation tile on load. The
references are ``qcompiler.ops.linear_w8a16_ref`` and ``linear_w4a16_ref``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler import int4
from qcompiler.runtimes import triton_tuning as tuning
from qcompiler.runtimes.triton_common import cast_rounded, dot_acc, rows_2d, store_rounded, tile_ids
from qcompiler.runtimes.triton_support import interpreting

_ONE_GROUP = 1 << 30  # INT8 weights: one scale per row, i.e. one group as long as any K


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, rn, rk, N, K, stride_wn, stride_sn, stride_zn,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, GROUP_SIZE: tl.constexpr, dtype: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile of ``W.T`` at rows ``rk``, columns ``rn``, in ``dtype``."""
    mask = (rk[:, None] < K) & (rn[None, :] < N)
    n_off = rn[None, :].to(tl.int64)
    if BITS == 4:
        byte = tl.load(w_ptr + n_off * stride_wn + rk[:, None] // 2, mask=mask, other=0)
        code = ((byte >> ((rk[:, None] % 2) * 4)) & 0xF).to(tl.float32)
        g = rk[:, None] // GROUP_SIZE
        if HAS_ZERO:
            code -= tl.load(z_ptr + n_off * stride_zn + g, mask=mask, other=0).to(tl.float32)
        else:
            code -= 8.0
        w = code * tl.load(s_ptr + n_off * stride_sn + g, mask=mask, other=0.0)
    else:
        q = tl.load(w_ptr + n_off * stride_wn + rk[:, None], mask=mask, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    return cast_rounded(w, dtype)


@triton.jit
def _activation_tile(x_ptr, smooth_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :],
                mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
    if HAS_SMOOTH:  # the reference's x * smooth_inv, in x's dtype
        s = tl.load(smooth_ptr + rk, mask=rk < K, other=0.0)
        x = cast_rounded(x.to(tl.float32) * s.to(tl.float32)[None, :], x.dtype)
    return x


@triton.autotune(configs=tuning.weight_only_gemm_configs(), key=tuning.AUTOTUNE_KEY,
                 prune_configs_by={"early_config_prune": tuning.prune_weight_only}, cache_results=True)
@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _activation_tile(x_ptr, smooth_ptr, rm, rk, M, K, stride_xm, HAS_SMOOTH)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rn, rk, N, K, stride_wn, stride_sn, stride_zn,
                         BITS, HAS_ZERO, GROUP_SIZE, x.dtype)
        acc = dot_acc(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    store_rounded(y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc,
                  (rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=tuning.weight_only_gemv_configs(), key=tuning.AUTOTUNE_KEY, reset_to_zero=["acc_ptr"],
                 cache_results=True)
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, smooth_ptr, bias_ptr, y_ptr, acc_ptr, M, N, K, M_BUCKET,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
                 BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SPLIT_K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _activation_tile(x_ptr, smooth_ptr, rm, rk, M, k_end, stride_xm, HAS_SMOOTH)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, rn, rk, N, k_end, stride_wn, stride_sn, stride_zn,
                         BITS, HAS_ZERO, GROUP_SIZE, x.dtype)
        acc = dot_acc(x, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        store_rounded(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask)
    else:
        tl.atomic_add(acc_ptr + rm[:, None] * N + rn[None, :], acc, mask=mask)


def _launch(x: Tensor, w: Tensor, scale: Tensor, zero: Optional[Tensor], smooth_inv: Optional[Tensor],
            bias: Optional[Tensor], n: int, bits: int, group_size: int, split_k: Optional[int]) -> Tensor:
    k = x.shape[-1]
    x2 = rows_2d(x)
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    smooth = None if smooth_inv is None else smooth_inv.to(x.dtype).contiguous()
    scale = scale.to(torch.float32).contiguous()
    args = dict(x_ptr=x2, w_ptr=w, s_ptr=scale, z_ptr=zero if zero is not None else w,
                smooth_ptr=smooth if smooth is not None else x2, bias_ptr=bias.contiguous() if bias is not None else x2,
                y_ptr=y, M=m, N=n, K=k, M_BUCKET=tuning.m_bucket(m), stride_xm=x2.stride(0), stride_wn=w.stride(0),
                stride_sn=scale.stride(0), stride_zn=zero.stride(0) if zero is not None else 0, stride_ym=y.stride(0),
                BITS=bits, HAS_ZERO=zero is not None, HAS_SMOOTH=smooth is not None, HAS_BIAS=bias is not None,
                GROUP_SIZE=group_size, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                UPCAST=interpreting() and x.dtype == torch.bfloat16)
    if m <= tuning.SMALL_M:
        split = split_k or tuning.gemv_split_k(n, k, tuning.sm_count(x.device))
        acc = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else y
        _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](acc_ptr=acc, SPLIT_K=split, **args)
        if split > 1:
            y.copy_(acc)  # float32 -> x.dtype, rounded to nearest even
    else:
        _gemm_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](**args)
    return y.reshape(*x.shape[:-1], n)


def _check_activation(x: Tensor, name: str) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} takes float32, bfloat16 or float16 activations, got {x.dtype}")


def linear_w8a16(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 split_k: Optional[int] = None) -> Tensor:
    """The ``linear_w8a16`` q-op on Triton: x ``[..., K]`` x INT8 ``[N, K]`` (per-row scales) -> ``[..., N]``."""
    _check_activation(x, "linear_w8a16")
    if wq.dtype != torch.int8 or wq.dim() != 2 or wq.shape[1] != x.shape[-1] or w_scale.shape != (wq.shape[0],):
        raise ValueError(f"linear_w8a16: weight {wq.dtype} {tuple(wq.shape)} with scale {tuple(w_scale.shape)} does "
                         f"not fit activation [..., {x.shape[-1]}]; expected int8 [N, K] and scale [N]")
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    return _launch(x, wq, w_scale, None, None, bias, wq.shape[0], 8, _ONE_GROUP, split_k)


def linear_w4a16(x: Tensor, packed: Tensor, scale: Tensor, zero: Optional[Tensor], smooth_inv: Optional[Tensor],
                 group_size: int, bias: Optional[Tensor], split_k: Optional[int] = None) -> Tensor:
    """The ``linear_w4a16`` q-op on Triton, on ``qcompiler.int4``'s packed layout."""
    _check_activation(x, "linear_w4a16")
    k = x.shape[-1]
    g = int4.groups(k, group_size)
    n = packed.shape[0]
    if packed.dtype != torch.uint8 or packed.shape != (n, g * group_size // 2) or scale.shape != (n, g):
        raise ValueError(f"linear_w4a16: packed {packed.dtype} {tuple(packed.shape)}, scale {tuple(scale.shape)} do not "
                         f"fit K={k} at group {group_size}; expected uint8 [N, {g * group_size // 2}] and scale [N, {g}]")
    if zero is not None and zero.shape != (n, g):
        raise ValueError(f"linear_w4a16: zero points {tuple(zero.shape)}; expected [N, {g}] (or None when symmetric)")
    if group_size % 2:
        raise ValueError(f"linear_w4a16: group size {group_size} must be even (two codes per byte)")
    return _launch(x, packed.contiguous(), scale, None if zero is None else zero.contiguous(), smooth_inv, bias, n,
                   4, group_size, split_k)
