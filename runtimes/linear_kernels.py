"""The kernels each linear q-op can run on a GPU: the tables ``kernel_choice`` measures.

One ``Family`` per q-op (``FAMILIES``, keyed by the q-op's name). A kernel is added by writing its
``Kernel`` row here: how it runs the q-op's arguments, whether it can run them (and why not), and
what it prepares once per weight. The first row that can run is the one taken where nothing is
measured (the CPU interpreter), so the tables start with the kernels the lowering always ran.

* ``linear_w4a16``: qcompile's Triton GEMV (split-K as ``triton_tuning`` picks it, or unsplit:
  no float32 buffer, zero fill or cast), torch's tinygemm (``runtimes.tinygemm``), the weight
  dequantized in one kernel then cuBLAS, and the packed GEMV (M = 1) and fused GEMM (codes
  dequantized in registers) on the weight re-packed once into int32 words
  (``runtimes.triton_packed``). The byte-layout fused GEMM of ``triton_weight_only`` is not a
  candidate: 0.06x-0.44x bf16 on the H200 and never chosen (docs/results/gpu_speed.md), more
  instructions per weight element than the packed GEMM (docs/results/sm90_decode_kernels_sass.md),
  and each candidate is compiled and timed at a shape's first call.
* ``linear_w8a16``: the GEMVs, the byte-layout fused GEMM (chosen at M = 128 on the H200),
  dequantize then cuBLAS, and of the packed kernels the GEMV.
* ``linear_w8a8``: cuBLASLt's FP8 ``_scaled_mm``, qcompile's Triton GEMM (scales in its epilogue),
  the same kernel under GEMV configs for M <= 16 (8-bit codes straight into the tensor cores, no
  conversion), and ``torch._int_mm`` followed by the scales (INT8, M > 16).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompiler import torch_compat
from qcompiler.ir import ops
from qcompiler.runtimes import tinygemm, triton_packed as tp, triton_tuning, triton_w8a8, triton_weight_only as wo
from qcompiler.runtimes.kernel_choice import Family, Kernel

SMALL_M = triton_tuning.SMALL_M


def _m_at_most_small(args, m):
    return (True, "") if m <= SMALL_M else (False, f"a GEMV takes M <= {SMALL_M}")


def _rows(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.randn(m, x.shape[-1], device=x.device).to(x.dtype)


def _float_linear(n: int, k: int, x: torch.Tensor, m: int, dtype=None):
    dtype = dtype or (x.dtype if x.is_floating_point() and x.element_size() >= 2 else torch.bfloat16)
    xf = torch.randn(m, k, device=x.device).to(dtype)
    w = torch.randn(n, k, device=x.device).to(dtype)
    return lambda: F.linear(xf, w)


# ----------------------------------------------------------------------------- W4A16
# args: (x, packed, scale, zero, smooth_inv, group_size, bias)

def _w4(path, split_k=None):
    return lambda a, prepared: wo.linear_w4a16(*a, split_k=split_k, path=path)


def _w4_packable(a, m):
    return tp.packable(4, a[1].shape[1] * 2, a[5])


def _one_row(can_run):
    return lambda a, m: can_run(a, m) if m == 1 else (False, "the packed GEMV takes M = 1")


def _w4_packed(path):
    return lambda a, p: tp.linear_packed(a[0], p[0], p[1], p[2] if len(p) > 2 else None, a[4], a[6], a[1].shape[0],
                                         4, a[5], path)


def _w4_prepare(a):  # one function for both packed rows: the plan re-packs a weight once for both
    return tp.prepare_w4(a[1], a[2], a[3])


def _tinygemm_can_run(a, m):
    x, packed, scale, zero, smooth, group, bias = a
    return tinygemm.can_run(x.dtype, x.device, packed.shape[0], x.shape[-1], packed.shape[1] * 2, group)


W4A16 = Family(
    "linear_w4a16",
    (Kernel("triton_gemv", _w4("gemv"), _m_at_most_small),
     Kernel("dequant_cublas", _w4("dequant")),
     Kernel("triton_gemv_unsplit", _w4("gemv", 1), _m_at_most_small),
     Kernel("tinygemm", lambda a, p: tinygemm.linear(a[0], p[0], p[1], a[5], a[1].shape[0], a[4], a[6]),
            _tinygemm_can_run, lambda a: tinygemm.prepare(a[1], a[2], a[3])),
     Kernel("triton_packed_gemv", _w4_packed("gemv"), _one_row(_w4_packable), _w4_prepare),
     Kernel("triton_packed_gemm", _w4_packed("gemm"), _w4_packable, _w4_prepare)),
    reference=ops.linear_w4a16_ref,
    with_rows=lambda a, m: (_rows(a[0], m), *a[1:]),
    shape=lambda a: (a[0].dtype, a[1].shape[0], a[0].shape[-1], a[5], a[3] is None, a[4] is None, a[6] is None),
    baseline=lambda a, m: _float_linear(a[1].shape[0], a[0].shape[-1], a[0], m),
)

# ----------------------------------------------------------------------------- W8A16
# args: (x, wq, w_scale, bias)


def _w8(path, split_k=None):
    return lambda a, prepared: wo.linear_w8a16(*a, split_k=split_k, path=path)


def _w8_packable(a, m):
    return tp.packable(8, a[1].shape[1], 0)


def _w8_packed_gemv(a, p):
    return tp.linear_packed(a[0], p[0], p[1], None, None, a[3], a[1].shape[0], 8, 0, "gemv")


def _w8_prepare(a):
    return tp.prepare_w8(a[1], a[2])


W8A16 = Family(
    "linear_w8a16",
    (Kernel("triton_gemv", _w8("gemv"), _m_at_most_small),
     Kernel("dequant_cublas", _w8("dequant")),
     Kernel("triton_gemv_unsplit", _w8("gemv", 1), _m_at_most_small),
     Kernel("triton_gemm", _w8("gemm")),
     Kernel("triton_packed_gemv", _w8_packed_gemv, _one_row(_w8_packable), _w8_prepare)),
    reference=ops.linear_w8a16_ref,
    with_rows=lambda a, m: (_rows(a[0], m), *a[1:]),
    shape=lambda a: (a[0].dtype, *a[1].shape, a[3] is None),
    baseline=lambda a, m: _float_linear(a[1].shape[0], a[1].shape[1], a[0], m),
)

# ----------------------------------------------------------------------------- W8A8
# args: (xq, x_scale, wq, w_scale, bias, out_dtype)


def _scaled_mm_can_run(a, m):
    xq, xs, wq, ws, bias, out_dtype = a
    if triton_w8a8.scaled_mm_fits(xq, wq, out_dtype, bias):
        return True, ""
    return False, "torch._scaled_mm takes FP8 on compute capability 8.9+, K and N multiples of 16, bf16 output"


def _int_mm_can_run(a, m):
    xq, xs, wq, ws, bias, out_dtype = a
    if xq.dtype != torch.int8 or xq.device.type != "cuda":
        return False, "torch._int_mm takes INT8 on CUDA"
    if m <= 16 or wq.shape[1] % 8 or wq.shape[0] % 8:
        return False, "torch._int_mm needs M > 16 and K, N multiples of 8"
    return True, ""


def _int_mm(a, prepared):
    xq, xs, wq, ws, bias, out_dtype = a
    x2 = xq.reshape(-1, xq.shape[-1])
    acc = torch_compat.int_mm(x2, wq.t())
    y = acc.to(torch.float32) * xs.reshape(-1, 1).to(torch.float32) * ws.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype).reshape(*xq.shape[:-1], wq.shape[0])


def _w8a8_rows(a, m):
    xq, xs, wq, ws, bias, out_dtype = a
    k = wq.shape[1]
    if xq.dtype == torch.int8:
        codes = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=xq.device)
    else:
        codes = torch.randn(m, k, device=xq.device).mul(64).clamp(-448, 448).to(xq.dtype)
    scale = (torch.rand((), device=xq.device) + 0.5 if xs.numel() == 1
             else torch.rand(m, 1, device=xq.device) + 0.5).to(xs.dtype) / 100
    return (codes, scale, wq, ws, bias, out_dtype)


W8A8 = Family(
    "linear_w8a8",
    (Kernel("scaled_mm", lambda a, p: triton_w8a8._scaled_mm(*a), _scaled_mm_can_run),
     Kernel("triton", lambda a, p: triton_w8a8.linear_w8a8_triton(*a)),
     Kernel("triton_gemv", lambda a, p: triton_w8a8.linear_w8a8_triton(*a, path="gemv"), _m_at_most_small),
     Kernel("int_mm", _int_mm, _int_mm_can_run)),
    reference=lambda xq, xs, wq, ws, bias, out_dtype: ops.linear_w8a8_ref(xq, xs, wq, ws, bias, torch.float32),
    with_rows=_w8a8_rows,
    shape=lambda a: (a[0].dtype, *a[2].shape, a[1].numel() == 1, a[4] is None, a[5]),
    baseline=lambda a, m: _float_linear(a[2].shape[0], a[2].shape[1], a[0], m, a[5]),
)

FAMILIES = {f.op: f for f in (W4A16, W8A16, W8A8)}
