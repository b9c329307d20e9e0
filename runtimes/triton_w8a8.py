"""W8A8 GEMM in Triton: INT8 x INT8 (int32 accumulator) or FP8 E4M3 x E4M3 (float32 accumulator),
the dequantization in the epilogue.

``y = (xq @ wq.T) * x_scale * w_scale + bias`` in the output dtype, one kernel: the per-token (or
per-tensor) activation scale and per-channel weight scale are applied to the accumulator tile
before its only store, so the int32 / float32 product never goes to memory (``torch._int_mm``
writes it and needs a second pass). Weights stay ``[N, K]``, K-major, which is the layout Hopper's
8-bit tensor-core instructions read both operands in. The reference is
``qcompiler.ir.ops.linear_w8a8_ref``; the INT8 product is exact (int32 accumulation), so results
differ from it only by the float32 epilogue's rounding.

FP8 on a CUDA device with FP8 tensor cores goes to ``torch._scaled_mm`` (cuBLASLt, row-wise
scales, bias and bf16 output in its epilogue) where its layout rules allow: on the H100 it measured
1.45x bf16 cuBLAS at M=2048, (K, N) = (4096, 11008), where this Triton kernel reached 0.83x
(benchmarks/gpu_gemm.py). ``linear_w8a8_triton`` is the Triton kernel alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler import torch_compat
from qcompiler.ir import ops
from qcompiler.runtimes import triton_tuning as tuning
from qcompiler.runtimes.triton_common import as_bytes, rows_2d, store_rounded, tile_ids
from qcompiler.runtimes.triton_support import interpreting


@triton.jit
def _w8a8_tiles(x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, K, M_BUCKET,
                 stride_xm, stride_wn, stride_ym, stride_xs,
                 IS_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if IS_FP8 else tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0)
        b = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < K - k0), other=0)
        if IS_FP8:  # FP8 travels as bytes (byte 0 is +0.0, so masked lanes add nothing)
            acc += tl.dot(a.to(tl.float8e4nv, bitcast=True), b.to(tl.float8e4nv, bitcast=True))
        else:
            acc += tl.dot(a, b, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    xs = tl.load(xs_ptr + rm * stride_xs, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    store_rounded(y_ptrs, y, (rm[:, None] < M) & (rn[None, :] < N))


# the same kernel under two config sets: the GEMM, and the GEMV of M <= 16 rows (one 16-row tile,
# narrow column tiles and deep K steps so a decode step's few rows still fill the SMs)
_w8a8_kernel = triton.autotune(configs=tuning.w8a8_configs(), key=tuning.AUTOTUNE_KEY,
                               prune_configs_by={"early_config_prune": tuning.prune_w8a8}, cache_results=True)(_w8a8_tiles)
_w8a8_gemv_kernel = triton.autotune(configs=tuning.w8a8_gemv_configs(), key=tuning.AUTOTUNE_KEY,
                                    cache_results=True)(_w8a8_tiles)


def check_operands(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor) -> None:
    """Shapes and dtypes the kernel takes, or a ValueError that says which and why."""
    if xq.dtype != wq.dtype or xq.dtype not in ops.QMAXES:
        raise ValueError(f"linear_w8a8 takes two int8 or two float8_e4m3fn operands, got {xq.dtype} x {wq.dtype}")
    if wq.dim() != 2 or xq.shape[-1] != wq.shape[1]:
        raise ValueError(f"linear_w8a8: activation [..., {xq.shape[-1]}] does not match weight {tuple(wq.shape)} ([N, K])")
    if w_scale.shape != (wq.shape[0],):
        raise ValueError(f"linear_w8a8: weight scale {tuple(w_scale.shape)} must be per output channel ({wq.shape[0]},)")
    if x_scale.numel() not in (1, xq[..., 0].numel()):
        raise ValueError(f"linear_w8a8: activation scale {tuple(x_scale.shape)} is neither per tensor nor per token")


def scaled_mm_fits(xq: Tensor, wq: Tensor, out_dtype: torch.dtype, bias: Optional[Tensor]) -> bool:
    """Whether ``torch._scaled_mm`` takes this FP8 product with row-wise scales: an FP8-capable CUDA
    device (compute capability 8.9+), K and N multiples of 16, bf16 output (its row-wise form's
    only one), bias absent or bf16."""
    if xq.dtype != ops.FP8 or xq.device.type != "cuda" or interpreting():
        return False
    k, n = wq.shape[1], wq.shape[0]
    return (torch.cuda.get_device_capability(xq.device) >= (8, 9) and k % 16 == 0 and n % 16 == 0
            and out_dtype == torch.bfloat16 and (bias is None or bias.dtype == torch.bfloat16))


def _scaled_mm(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    x2 = xq.reshape(-1, xq.shape[-1]).contiguous()
    m, n = x2.shape[0], wq.shape[0]
    xs = x_scale.reshape(-1, 1).to(torch.float32).expand(m, 1).contiguous()  # per tensor -> per row
    ws = w_scale.reshape(1, n).to(torch.float32).contiguous()
    wt = (wq if wq.stride(-1) == 1 else wq.contiguous()).t()  # [K, N] column-major, as cuBLASLt wants
    y = torch_compat.scaled_mm(x2, wt, scale_a=xs, scale_b=ws, bias=bias, out_dtype=out_dtype)
    return y.reshape(*xq.shape[:-1], n)


def linear_w8a8(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """The ``linear_w8a8`` q-op on the GPU: ``[..., K]`` 8-bit x ``[N, K]`` 8-bit -> ``[..., N]`` out_dtype.

    FP8 goes to ``torch._scaled_mm`` where ``scaled_mm_fits`` (measured faster, module docstring);
    everything else to the Triton kernel."""
    check_operands(xq, x_scale, wq, w_scale)
    if xq.shape[:-1].numel() and scaled_mm_fits(xq, wq, out_dtype, bias):
        return _scaled_mm(xq, x_scale, wq, w_scale, bias, out_dtype)
    return linear_w8a8_triton(xq, x_scale, wq, w_scale, bias, out_dtype)


def linear_w8a8_triton(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                       bias: Optional[Tensor], out_dtype: torch.dtype, path: str = "gemm") -> Tensor:
    """``linear_w8a8`` always on the Triton kernel, under the GEMM's configs or (``path="gemv"``,
    M <= ``tuning.SMALL_M``) the GEMV's."""
    check_operands(xq, x_scale, wq, w_scale)
    k, n = wq.shape[1], wq.shape[0]
    x2 = rows_2d(xq)
    m = x2.shape[0]
    if path not in ("gemm", "gemv") or (path == "gemv" and m > tuning.SMALL_M):
        raise ValueError(f"linear_w8a8 path {path!r} cannot take M={m}: 'gemv' takes M <= {tuning.SMALL_M}, "
                         "'gemm' any M")
    kernel = _w8a8_gemv_kernel if path == "gemv" else _w8a8_kernel
    wq = wq if wq.stride(-1) == 1 else wq.contiguous()
    xs = x_scale.reshape(-1).to(torch.float32).contiguous()
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](
            as_bytes(x2), as_bytes(wq), xs, w_scale.to(torch.float32).contiguous(),
            bias.contiguous() if bias is not None else xs, y, m, n, k, tuning.m_bucket(m),
            x2.stride(0), wq.stride(0), y.stride(0), 0 if xs.numel() == 1 else 1,
            IS_FP8=xq.dtype == ops.FP8, HAS_BIAS=bias is not None)
    return y.reshape(*xq.shape[:-1], n)
