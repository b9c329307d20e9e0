"""Fake quantization: each scheme's rounding as a differentiable function, for training (``qcompiler.qat``).

Forward, every function returns exactly the values the scheme's reference q-op computes with
(the codes times their scale, in float32): the same division, the same rounding (half to even
for integers, the cast for FP8), the same clamping. Backward:

* rounding passes the gradient straight through (the straight-through estimator);
* a value clipped at the end of the grid gets no gradient (``clamp``'s own derivative);
* a learned scale ``s`` gets the step-size gradient of LSQ (Esser et al., 2020): ``v = x / s``,
  ``x_hat = s * q(clamp(v))`` gives ``d x_hat / d s = q - v`` inside the grid and the grid's end
  outside it, scaled by ``1 / sqrt(N * Qp)`` (N the values sharing the scale, Qp the grid's
  largest positive code) so that scales and weights train at one learning rate;
* a per-token (dynamic) scale is a function of the activation, not a parameter: it is held
  constant in the backward pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from qcompiler.ir import int4
from qcompiler.ir.numerics import FP8, MIN_AMAX, QMAX, QMAXES, QMIN, join_blocks, scale_from_amax, split_blocks

# a learned scale never reaches 0 (the smallest normal float32: any scale a calibration gives is larger)
_MIN_SCALE = torch.finfo(torch.float32).tiny


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` (half to even) forward, identity backward."""

    @staticmethod
    def forward(ctx, v):
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _CastSTE(torch.autograd.Function):
    """A round trip through ``dtype`` (FP8's round to nearest even) forward, identity backward."""

    @staticmethod
    def forward(ctx, v, dtype):
        return v.to(dtype).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GradScaled(torch.autograd.Function):
    """Identity forward (bit for bit), the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def grad_scaled(t: Tensor, factor: float) -> Tensor:
    """``t`` forward; its gradient multiplied by ``factor`` backward."""
    return _GradScaled.apply(t, factor)


def lsq_factor(shared: int, qmax: float) -> float:
    """LSQ's gradient scale for a step size shared by ``shared`` values on a grid reaching ``qmax``."""
    return 1.0 / math.sqrt(max(1, shared) * qmax)


def positive(scale: Tensor) -> Tensor:
    return scale.clamp_min(_MIN_SCALE)


def codes(v: Tensor, low: Tensor | float, high: Tensor | float, qdtype: Optional[torch.dtype] = None) -> Tensor:
    """Scaled values -> their codes as floats: clamp then round (integers) or cast (FP8)."""
    v = torch.clamp(v, low, high) if isinstance(low, float) else torch.maximum(torch.minimum(v, high), low)
    return _CastSTE.apply(v, FP8) if qdtype == FP8 else _RoundSTE.apply(v)


def _grid(qdtype: torch.dtype) -> tuple[float, float]:
    return (float(QMIN), float(QMAX)) if qdtype == torch.int8 else (-QMAXES[qdtype], QMAXES[qdtype])


def per_channel(w: Tensor, scale: Tensor, qdtype: torch.dtype) -> Tensor:
    """``[N, K]`` weight on its 8-bit grid with one learned scale per output row ``[N]``
    (``ops.quantize_per_channel_ref`` then ``dequantize_ref``)."""
    low, high = _grid(qdtype)
    s = grad_scaled(positive(scale), lsq_factor(w.shape[1], high))[:, None]
    return codes(w.to(torch.float32) / s, low, high, qdtype) * s


def per_tensor(x: Tensor, scale: Tensor, qdtype: torch.dtype) -> Tensor:
    """Activations on the 8-bit grid of one learned 0-d scale (``ops.quantize_per_tensor_ref``)."""
    low, high = _grid(qdtype)
    s = grad_scaled(positive(scale), lsq_factor(x.shape[-1], high))
    return codes(x.to(torch.float32) / s, low, high, qdtype) * s


def per_token(x: Tensor, qdtype: torch.dtype) -> Tensor:
    """Activations on the 8-bit grid of their own row's scale (``ops.quantize_per_token_ref``)."""
    x = x.to(torch.float32)
    low, high = _grid(qdtype)
    s = scale_from_amax(x.detach().abs().amax(dim=-1, keepdim=True), qdtype)
    return codes(x / s, low, high, qdtype) * s


def per_block(x: Tensor, block_size: int, qdtype: torch.dtype) -> Tensor:
    """Activations on the 8-bit grid of their own block's scale (``ops.quantize_per_block_ref``)."""
    x = x.to(torch.float32)
    grouped = split_blocks(x, block_size)
    low, high = _grid(qdtype)
    amax = grouped.detach().abs().amax(dim=-1, keepdim=True).clamp_min(MIN_AMAX)
    s = scale_from_amax(amax, qdtype)
    return join_blocks(codes(grouped * (high / amax), low, high, qdtype) * s, x.shape[-1])


class _FakeInt4(torch.autograd.Function):
    """``int4_grouped`` in one autograd node: the backward pass recomputes the scaled values and
    codes from the weight and scales instead of keeping them (two or three weight-sized float32
    tensors per layer fewer held between forward and backward). Same values, same gradients."""

    @staticmethod
    def forward(ctx, w, scale, zero, group_size, factor):
        g, s, low, high = _int4_parts(w, scale, zero, group_size)
        out = codes(g / s, low, high) * s
        ctx.save_for_backward(w, scale, zero)
        ctx.group_size, ctx.factor = group_size, factor
        return join_blocks(out, w.shape[1])

    @staticmethod
    def backward(ctx, grad):
        w, scale, zero = ctx.saved_tensors
        g, s, low, high = _int4_parts(w, scale, zero, ctx.group_size)
        v = g / s
        c = torch.clamp(v, low, high) if isinstance(low, float) else torch.maximum(torch.minimum(v, high), low)
        inside = (v >= low) & (v <= high)
        grad_g = int4.grouped(grad, ctx.group_size)
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = join_blocks(torch.where(inside, grad_g, 0.0), w.shape[1]).to(w.dtype)
        grad_s = None
        if ctx.needs_input_grad[1]:
            # d x_hat / d s: q - v inside the grid, the grid's end outside; positive()'s clamp passes it where
            # the scale is at or above its floor (clamp_min's derivative)
            step = torch.where(inside, torch.round(c) - v, c)
            grad_s = (grad_g * step).sum(-1) * ctx.factor
            grad_s = torch.where(scale >= _MIN_SCALE, grad_s, 0.0)
        return grad_w, grad_s, None, None, None


def _int4_parts(w: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int):
    """(grouped weight [N, G, gs], scale [N, G, 1], low, high): the grid's ends as floats
    (symmetric) or [N, G, 1] tensors (asymmetric)."""
    g = int4.grouped(w, group_size)
    if zero is None:
        low, high = -float(int4.SYMMETRIC_ZERO), float(int4.SYMMETRIC_QMAX)
    else:
        z = zero.to(torch.float32)[..., None]
        low, high = -z, int4.UMAX - z
    return g, positive(scale)[..., None], low, high


def int4_grouped(w: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int) -> Tensor:
    """``[N, K]`` weight on the INT4 grid of ``qcompiler.ir.int4``: learned scales ``[N, G]``, zero
    points ``[N, G]`` held fixed (None: symmetric, codes -8..7)."""
    qmax = float(int4.SYMMETRIC_QMAX) if zero is None else float(int4.UMAX)
    return _FakeInt4.apply(w, scale, zero, group_size, lsq_factor(group_size, qmax))
