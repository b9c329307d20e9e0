"""The q-op IR: the few quantized operators every pass emits and every lowering consumes.

Each op is a ``torch.library`` custom op under the ``qcompile`` namespace with

* a reference implementation in plain torch (the numerical ground truth; any device), and
* a fake implementation, so Dynamo, AOTAutograd, Inductor and ``torch.export`` can trace it.

Conventions shared by every op (and by every lowering, ONNX included):

* INT8 is symmetric with zero-point 0: ``q = clamp(round_half_even(x / scale), -128, 127)``,
  ``x ~= q * scale``.  Scales are float32 and never zero (an all-zero row gets a tiny scale,
  so it quantizes to zeros instead of NaN).
* Weights are ``[N, K]`` (as ``F.linear`` takes them), scales per output channel ``[N]``.
* Activation scales are per token (shape ``x.shape[:-1] + (1,)``) or per tensor (0-d).
* ``smooth_inv`` is the SmoothQuant reciprocal scale ``1/s`` over the last dimension, applied
  inside the activation quantize step (never as a separate pass over the activation).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

QMIN, QMAX = -128, 127
# Scales are amax / 127; keep them strictly positive so all-zero rows quantize to 0, not NaN.
_MIN_AMAX = 1e-12
# Integer products are at most 128 * 128; float32 represents every integer up to 2**24 exactly,
# so an fp32 accumulation over K <= 1024 terms is exact integer arithmetic.
_FP32_EXACT_K = 2**24 // (128 * 128)


def _round_clamp(x: Tensor) -> Tensor:
    return torch.clamp(torch.round(x), QMIN, QMAX).to(torch.int8)


def _apply_smooth(x: Tensor, smooth_inv: Optional[Tensor]) -> Tensor:
    x = x.to(torch.float32)
    return x if smooth_inv is None else x * smooth_inv


def scale_from_amax(amax: Tensor) -> Tensor:
    """Symmetric INT8 scale for a given absolute maximum (float32, never zero)."""
    return (amax.to(torch.float32).clamp_min(_MIN_AMAX) / QMAX).to(torch.float32)


def int_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact ``xq @ wq.T`` of int8 operands, returned as float64 (the values are integers).

    Plain-torch integer matmul is not implemented on every device, so K is split into chunks
    of at most 1024, each an exact float32 product, and the chunks are summed in float64
    (exact far beyond any int32 accumulator). Reduced-precision float32 matmul modes (TF32 on
    GPUs, bf16 on CPUs) keep this exact: int8 values are representable in both, and they
    still accumulate in float32.
    """
    k = xq.shape[-1]
    out = None
    for start in range(0, k, _FP32_EXACT_K):
        part = torch.matmul(xq[..., start:start + _FP32_EXACT_K].to(torch.float32),
                            wq[:, start:start + _FP32_EXACT_K].to(torch.float32).t()).to(torch.float64)
        out = part if out is None else out + part
    return out


# ----------------------------------------------------------------------------- quantize ops


def quantize_per_channel_ref(w: Tensor) -> tuple[Tensor, Tensor]:
    """Weight ``[N, K]`` -> (int8 ``[N, K]``, float32 scale ``[N]``), one scale per output row."""
    amax = w.detach().to(torch.float32).abs().amax(dim=-1)
    scale = scale_from_amax(amax)
    return _round_clamp(w.to(torch.float32) / scale[:, None]), scale


def _quantize_per_channel_fake(w):
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[:1], dtype=torch.float32)


def quantize_per_token_ref(x: Tensor, smooth_inv: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Dynamic per-token INT8: (int8 like x, float32 scale ``x.shape[:-1] + (1,)``)."""
    xs = _apply_smooth(x, smooth_inv)
    scale = scale_from_amax(xs.abs().amax(dim=-1, keepdim=True))
    return _round_clamp(xs / scale), scale


def _quantize_per_token_fake(x, smooth_inv=None):
    return (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def quantize_per_tensor_ref(x: Tensor, scale: Tensor, smooth_inv: Optional[Tensor] = None) -> Tensor:
    """Static per-tensor INT8 with a calibrated 0-d ``scale``; values beyond it saturate."""
    return _round_clamp(_apply_smooth(x, smooth_inv) / scale)


def _quantize_per_tensor_fake(x, scale, smooth_inv=None):
    return x.new_empty(x.shape, dtype=torch.int8)


def dequantize_ref(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in float32; ``scale`` broadcasts (per tensor, per token, or ``[N, 1]``)."""
    return q.to(torch.float32) * scale


def _dequantize_fake(q, scale):
    return q.new_empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=torch.float32)


# ----------------------------------------------------------------------------- linear ops


def linear_w8a8_ref(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """INT8 x INT8 linear with the dequantization in the epilogue.

    ``y = (xq @ wq.T) * x_scale * w_scale + bias``, the integer product exact.
    """
    y = int_matmul(xq, wq) * x_scale.to(torch.float64) * w_scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def _linear_w8a8_fake(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


def linear_w8a16_ref(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """INT8 weight-only linear: ``y = x @ (wq * w_scale[:, None]).T + bias`` in x's dtype."""
    w = (wq.to(torch.float32) * w_scale[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _linear_w8a16_fake(x, wq, w_scale, bias):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


def _define(name: str, ref, fake):
    op = torch.library.custom_op(f"qcompile::{name}", ref, mutates_args=())
    op.register_fake(fake)
    return op


quantize_per_channel = _define("quantize_per_channel", quantize_per_channel_ref, _quantize_per_channel_fake)
quantize_per_token = _define("quantize_per_token", quantize_per_token_ref, _quantize_per_token_fake)
quantize_per_tensor = _define("quantize_per_tensor", quantize_per_tensor_ref, _quantize_per_tensor_fake)
dequantize = _define("dequantize", dequantize_ref, _dequantize_fake)
linear_w8a8 = _define("linear_w8a8", linear_w8a8_ref, _linear_w8a8_fake)
linear_w8a16 = _define("linear_w8a16", linear_w8a16_ref, _linear_w8a16_fake)

# op overload (what appears in FX graphs) -> its plain-torch reference implementation
REFERENCE = {
    torch.ops.qcompile.quantize_per_channel.default: quantize_per_channel_ref,
    torch.ops.qcompile.quantize_per_token.default: quantize_per_token_ref,
    torch.ops.qcompile.quantize_per_tensor.default: quantize_per_tensor_ref,
    torch.ops.qcompile.dequantize.default: dequantize_ref,
    torch.ops.qcompile.linear_w8a8.default: linear_w8a8_ref,
    torch.ops.qcompile.linear_w8a16.default: linear_w8a16_ref,
}
