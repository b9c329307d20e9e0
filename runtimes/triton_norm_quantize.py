"""An RMS norm and the per-token activation quantization of its output, as one Triton kernel.

Linears reading a normed activation (q/k/v after the attention norm, gate/up after the MLP
norm) quantize it per token: on a GPU the norm is one kernel (Inductor's) writing the activation
and the quantization a second reading it back. ``rmsnorm_quantize`` does both in one pass over
the row, as transformers' Llama-family ``RMSNorm`` computes the norm (``rmsnorm_quantize_ref``:
float32 mean of squares, ``rsqrt``, the product rounded to the model's dtype, times the weight in
that dtype) and as ``quantize_per_token`` quantizes (``triton_quantize``'s arithmetic: correctly
rounded division, round half to even, a NaN row a NaN scale). Rows up to ``MAX_ROW`` elements
(one tile in registers); the triton lowering fuses only those.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.ir import ops
from qcompiler.runtimes.triton_common import as_bytes, cast_rounded, rows_2d
from qcompiler.runtimes.triton_quantize import _nan_if, _to_code
from qcompiler.runtimes.triton_support import interpreting

MAX_ROW = 16384


def rmsnorm_quantize_ref(h: Tensor, weight: Tensor, eps: float, smooth_inv: Optional[Tensor], qdtype: torch.dtype,
                         out_dtype: torch.dtype) -> tuple:
    """The plain-torch definition: the norm as transformers writes it, then ``quantize_per_token_ref``."""
    x = h.to(torch.float32)
    y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(out_dtype)
    return ops.quantize_per_token_ref(weight * y, smooth_inv, qdtype)


@triton.jit
def _norm_quantize_kernel(h_ptr, w_ptr, smooth_ptr, q_ptr, scale_ptr, K, stride_h, stride_q, eps, qmax,
                          HAS_SMOOTH: tl.constexpr, IS_FP8: tl.constexpr, ROUND_BF16: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < K
    x = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(x * x, axis=0) / K + eps))
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    # x * rsqrt(...) rounded to the model's dtype, times the weight in that dtype
    y = cast_rounded(x * r, w.dtype) if ROUND_BF16 else (x * r).to(w.dtype)
    y = w.to(tl.float32) * y.to(tl.float32)
    y = (cast_rounded(y, w.dtype) if ROUND_BF16 else y.to(w.dtype)).to(tl.float32)
    if HAS_SMOOTH:
        y = y * tl.load(smooth_ptr + cols, mask=ok, other=0.0)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12), qmax)
    scale = _nan_if(tl.sum((y != y).to(tl.int32), axis=0) > 0, scale)
    tl.store(q_ptr + row * stride_q + cols, _to_code(tl.math.div_rn(y, scale), IS_FP8), mask=ok)
    tl.store(scale_ptr + row, scale)


def rmsnorm_quantize(h: Tensor, weight: Tensor, eps: float, smooth_inv: Optional[Tensor], qdtype: torch.dtype,
                     out_dtype: torch.dtype) -> tuple:
    """``rmsnorm_quantize_ref`` in one kernel: (codes like ``h``, float32 scales ``h.shape[:-1] + (1,)``)."""
    k = h.shape[-1]
    if k > MAX_ROW:
        raise ValueError(f"rmsnorm_quantize takes rows of at most {MAX_ROW} elements, not {k}")
    if weight.shape != (k,) or weight.dtype != out_dtype:
        raise ValueError(f"rmsnorm_quantize: weight {weight.dtype} {tuple(weight.shape)}; expected {out_dtype} ({k},)")
    rows = rows_2d(h)
    q = torch.empty(rows.shape, dtype=qdtype, device=h.device)
    scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=h.device)
    smooth = None if smooth_inv is None else smooth_inv.to(device=h.device, dtype=torch.float32).contiguous()
    if rows.shape[0]:
        block = triton.next_power_of_2(k)
        _norm_quantize_kernel[(rows.shape[0],)](
            rows, weight.contiguous(), smooth if smooth is not None else rows, as_bytes(q), scale, k, rows.stride(0),
            q.stride(0), float(eps), ops.QMAXES[qdtype], HAS_SMOOTH=smooth is not None, IS_FP8=qdtype == ops.FP8,
            ROUND_BF16=out_dtype == torch.bfloat16 and interpreting(), BLOCK_K=block,
            num_warps=8 if block >= 4096 else 4)
    return q.reshape(h.shape), scale.reshape(*h.shape[:-1], 1)
