"""The q-op IR: the few quantized operators every pass emits and every lowering consumes.

Each op is a ``torch.library`` custom op under the ``qcompile`` namespace with

* a reference implementation in plain torch (the numerical ground truth; any device), and
* a fake implementation, so Dynamo, AOTAutograd, Inductor and ``torch.export`` can trace it.

Conventions shared by every op (and by every lowering, ONNX included):

* 8-bit values are INT8 (the default) or FP8 E4M3 (``qdtype=torch.float8_e4m3fn``), both
  symmetric: INT8 ``q = clamp(round_half_even(x / scale), -128, 127)``; FP8
  ``q = fp8(clamp(x / scale, -448, 448))`` (round to nearest even in the cast); ``x ~= q * scale``
  and ``scale = amax / qmax`` (127 or 448). Scales are float32 and never zero (an all-zero row
  gets a tiny scale, so it quantizes to zeros instead of NaN).
* INT4 weights use the packed group-wise layout of ``qcompiler.ir.int4``.
* Weights are ``[N, K]`` (as ``F.linear`` takes them), scales per output channel ``[N]``; they are
  quantized once when the graph is compiled (``quantize_per_channel_ref``, a plain function: no
  graph ever carries a float weight to quantize at run time).
* Activation scales are per token (shape ``x.shape[:-1] + (1,)``), per tensor (0-d), or per block
  of ``block_size`` consecutive input channels of a token (``linear_w8a8_blocks``: shape
  ``x.shape[:-1] + (ceil(K / block_size),)``, a last block shorter than the others when K is not a
  multiple; llama.cpp's Q8_0 and ONNX Runtime's ``MatMulNBits`` at accuracy level 4 round the
  activations this way).
* ``smooth_inv`` is the SmoothQuant reciprocal scale ``1/s`` over the last dimension, applied
  inside the activation quantize step (never as a separate pass over the activation).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler import torch_compat
from qcompiler.ir import attention, attention_static, kv, kv_attention
from qcompiler.ir.numerics import FP8, MIN_AMAX as _MIN_AMAX, QMAX, QMAXES, QMIN, join_blocks, split_blocks
from qcompiler.ir.numerics import round_clamp as _round_clamp
from qcompiler.ir.numerics import row_blocks
from qcompiler.ir.numerics import scale_from_amax  # noqa: F401  (part of this module's interface)

# Integer products are at most 128 * 128; float32 represents every integer up to 2**24 exactly,
# so an fp32 accumulation over K <= 1024 terms is exact integer arithmetic.
_FP32_EXACT_K = 2**24 // (128 * 128)


def _apply_smooth(x: Tensor, smooth_inv: Optional[Tensor]) -> Tensor:
    x = x.to(torch.float32)
    return x if smooth_inv is None else x * smooth_inv


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


def exact_matmul(xq: Tensor, wq: Tensor) -> Tensor:
    """Exact ``xq @ wq.T`` of two INT8 or two FP8 operands, as float64.

    FP8 E4M3 values carry 4 significant bits and lie within [2**-9, 448]: each product fits in
    8 significant bits between 2**-18 and 2**18, so float64 (53 bits) sums them exactly.
    """
    if xq.dtype == torch.int8 and wq.dtype == torch.int8:
        return int_matmul(xq, wq)
    if xq.dtype == FP8 and wq.dtype == FP8:
        return torch.matmul(xq.to(torch.float64), wq.to(torch.float64).t())
    raise ValueError(f"linear_w8a8 takes two int8 or two float8_e4m3fn operands, got {xq.dtype} x {wq.dtype}")


# ----------------------------------------------------------------------------- quantize ops


def quantize_per_channel_ref(w: Tensor, qdtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """Weight ``[N, K]`` -> (``qdtype`` ``[N, K]``, float32 scale ``[N]``), one scale per output row.
    Rows are independent: a large weight goes a block of rows at a time (``numerics.row_blocks``)."""
    blocks = row_blocks(w)
    if len(blocks) == 1:
        return _per_channel(w, qdtype)
    codes = torch.empty(w.shape, dtype=qdtype, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for rows in blocks:
        codes[rows], scale[rows] = _per_channel(w[rows], qdtype)
    return codes, scale


def _per_channel(w: Tensor, qdtype: torch.dtype) -> tuple[Tensor, Tensor]:
    amax = w.detach().to(torch.float32).abs().amax(dim=-1)
    scale = scale_from_amax(amax, qdtype)
    return _round_clamp(w.to(torch.float32) / scale[:, None], qdtype), scale



def quantize_per_token_ref(x: Tensor, smooth_inv: Optional[Tensor] = None,
                           qdtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """Dynamic per-token: (``qdtype`` like x, float32 scale ``x.shape[:-1] + (1,)``)."""
    xs = _apply_smooth(x, smooth_inv)
    scale = scale_from_amax(xs.abs().amax(dim=-1, keepdim=True), qdtype)
    return _round_clamp(xs / scale, qdtype), scale


def _quantize_per_token_fake(x, smooth_inv=None, qdtype=torch.int8):
    return (x.new_empty(x.shape, dtype=qdtype),
            x.new_empty((*x.shape[:-1], 1), dtype=torch.float32))


def quantize_per_tensor_ref(x: Tensor, scale: Tensor, smooth_inv: Optional[Tensor] = None,
                            qdtype: torch.dtype = torch.int8) -> Tensor:
    """Static per-tensor with a calibrated 0-d ``scale``; values beyond it saturate."""
    return _round_clamp(_apply_smooth(x, smooth_inv) / scale, qdtype)


def quantize_per_block_ref(x: Tensor, block_size: int, smooth_inv: Optional[Tensor] = None,
                           qdtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """Dynamic per block of ``block_size`` input channels: (``qdtype`` like x, float32 scale
    ``x.shape[:-1] + (ceil(K / block_size),)``); a last, shorter block has a scale of its own.

    The values are multiplied by ``qmax / amax`` rather than divided by the scale (one rounding
    of the quotient instead of two): ONNX Runtime's ``MatMulNBits`` quantizes its input so, and
    the two differ at about one value in a million, a near-tie rounded the other way."""
    xs = _apply_smooth(x, smooth_inv)
    grouped = split_blocks(xs, block_size)
    amax = grouped.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_AMAX)
    scale = scale_from_amax(amax, qdtype)
    codes = join_blocks(_round_clamp(grouped * (QMAXES[qdtype] / amax), qdtype), xs.shape[-1])
    return codes, scale.squeeze(-1)


def dequantize_blocks(q: Tensor, scale: Tensor, block_size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-block codes and scales (``quantize_per_block_ref``) -> ``dtype`` values of q's shape."""
    return join_blocks(split_blocks(q.to(dtype), block_size) * scale.to(dtype)[..., None], q.shape[-1])


def _quantize_per_tensor_fake(x, scale, smooth_inv=None, qdtype=torch.int8):
    return x.new_empty(x.shape, dtype=qdtype)


def dequantize_ref(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in float32; ``scale`` broadcasts (per tensor, per token, or ``[N, 1]``)."""
    return q.to(torch.float32) * scale



# ----------------------------------------------------------------------------- linear ops


def linear_w8a8_ref(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """8-bit x 8-bit linear (INT8 or FP8 operands) with the dequantization in the epilogue.

    ``y = (xq @ wq.T) * x_scale * w_scale + bias``, the product of the 8-bit values exact.
    """
    y = exact_matmul(xq, wq) * x_scale.to(torch.float64) * w_scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def linear_w8a8_blocks_ref(x: Tensor, smooth_inv: Optional[Tensor], wq: Tensor, w_scale: Tensor,
                           bias: Optional[Tensor], block_size: int, out_dtype: torch.dtype) -> Tensor:
    """INT8 x INT8 linear with activations quantized per block of ``block_size`` input channels.

    ``y = sum_b sx_b * (xq_b @ wq_b.T) * w_scale + bias`` over the blocks b of each row: every
    block's integer dot product exact, weighted by its own activation scale (float64 here).
    """
    xq, sx = quantize_per_block_ref(x, block_size, smooth_inv)
    y = torch.matmul(dequantize_blocks(xq, sx, block_size, torch.float64), wq.to(torch.float64).t())
    y = y * w_scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


# The second pass's grid: what the first pass's rounding leaves is at most half a code, and
# 254 half-codes still fit int8.
TWO_PASS_FINE = 254


def quantize_two_pass_ref(x: Tensor, smooth_inv: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token int8 codes of x and of what their rounding left, on a grid ``TWO_PASS_FINE``
    times finer: ``(hi, lo, scale)`` with ``t = x / scale``, ``hi = round(t)``,
    ``lo = round((t - hi) * 254)``, so ``x ~ (hi + lo / 254) * scale`` within ``scale / 508``.

    The ort form of ``linear_w8a8_blocks`` at more than a few rows computes this (two integer GEMMs
    at ``MatMulIntegerToFloat``'s speed, where ``MatMulNBits``' per-block activations are slower
    than a float GEMM): a row's grid is 254 times finer than its per-token one, so each product is
    at least as exact as the per-block reference's (tests/unit/test_linear_blocks.py). A row
    holding NaN or Inf gets a NaN scale (its sum times zero), as the ONNX form carries it."""
    xs = _apply_smooth(x, smooth_inv)
    scale = scale_from_amax(xs.abs().amax(dim=-1, keepdim=True)) + xs.sum(dim=-1, keepdim=True) * 0
    t = xs / scale
    hi = torch.round(t)
    lo = torch.round((t - hi) * TWO_PASS_FINE)
    finite = torch.isfinite(scale)
    return (torch.where(finite, hi, 0).to(torch.int8), torch.where(finite, lo, 0).to(torch.int8), scale)


def linear_w8a8_two_pass_ref(x: Tensor, smooth_inv: Optional[Tensor], wq: Tensor, w_scale: Tensor,
                             bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``(hi @ wq.T + lo @ wq.T / 254) * scale * w_scale + bias`` of ``quantize_two_pass_ref``'s
    codes, the integer products exact (float64 here)."""
    hi, lo, scale = quantize_two_pass_ref(x, smooth_inv)
    y = int_matmul(hi, wq) + int_matmul(lo, wq) / TWO_PASS_FINE
    y = y * scale.to(torch.float64) * w_scale.to(torch.float64)
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(out_dtype)


def _linear_w8a8_blocks_fake(x, smooth_inv, wq, w_scale, bias, block_size, out_dtype):
    _feature_size_is_weights(x, wq.shape[1])
    return x.new_empty((*x.shape[:-1], wq.shape[0]), dtype=out_dtype)


def _feature_size_is_weights(x, k: int) -> None:
    """The activation's feature size is the weight's: a graph traced with every size symbolic
    (``dynamic=True``) learns it here, so exports and compiles see a static K."""
    torch_compat.check(x.shape[-1] == k, lambda: f"activation feature size {x.shape[-1]} != the weight's {k}")


def _linear_w8a8_fake(xq, x_scale, wq, w_scale, bias, out_dtype):
    _feature_size_is_weights(xq, wq.shape[1])
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


def linear_w8a16_ref(x: Tensor, wq: Tensor, w_scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """INT8 weight-only linear: ``y = x @ (wq * w_scale[:, None]).T + bias`` in x's dtype."""
    w = (wq.to(torch.float32) * w_scale[:, None]).to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _linear_w8a16_fake(x, wq, w_scale, bias):
    _feature_size_is_weights(x, wq.shape[1])
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


def linear_w4a16_ref(x: Tensor, packed: Tensor, scale: Tensor, zero: Optional[Tensor],
                     smooth_inv: Optional[Tensor], group_size: int, bias: Optional[Tensor]) -> Tensor:
    """INT4 weight-only linear (``qcompiler.ir.int4`` layout): ``y = (x / s) @ W4.T + bias`` in x's dtype.

    ``smooth_inv`` is AWQ's ``1/s`` when it could not be folded into the producer of ``x``.
    """
    from qcompiler.ir import int4

    w = int4.dequantize(packed, scale, zero, group_size, x.shape[-1]).to(x.dtype)
    if smooth_inv is not None:
        x = x * smooth_inv.to(x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def _linear_w4a16_fake(x, packed, scale, zero, smooth_inv, group_size, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# ----------------------------------------------------------------------------- embedding op


def embedding_int8_ref(indices: Tensor, wq: Tensor, w_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Rows of an INT8 table ``[V, D]`` quantized per row (``w_scale`` ``[V]``, as
    ``quantize_per_channel`` makes them), gathered, then dequantized: ``wq[i] * w_scale[i]``."""
    rows = torch.nn.functional.embedding(indices, wq).to(torch.float32)
    return (rows * torch.nn.functional.embedding(indices, w_scale[:, None])).to(out_dtype)


def _embedding_int8_fake(indices, wq, w_scale, out_dtype):
    return wq.new_empty((*indices.shape, wq.shape[1]), dtype=out_dtype)


# q-op name -> its fake implementation (shapes and dtypes only); lowerings that wrap a q-op in an
# op of their own (the Triton kernels) reuse it
FAKES: dict = {}


def _define(name: str, ref, fake):
    op = torch.library.custom_op(f"qcompile::{name}", ref, mutates_args=())
    op.register_fake(fake)
    FAKES[name] = fake
    return op


quantize_per_token = _define("quantize_per_token", quantize_per_token_ref, _quantize_per_token_fake)
quantize_per_tensor = _define("quantize_per_tensor", quantize_per_tensor_ref, _quantize_per_tensor_fake)
linear_w8a8 = _define("linear_w8a8", linear_w8a8_ref, _linear_w8a8_fake)
linear_w8a8_blocks = _define("linear_w8a8_blocks", linear_w8a8_blocks_ref, _linear_w8a8_blocks_fake)
linear_w8a16 = _define("linear_w8a16", linear_w8a16_ref, _linear_w8a16_fake)
linear_w4a16 = _define("linear_w4a16", linear_w4a16_ref, _linear_w4a16_fake)
embedding_int8 = _define("embedding_int8", embedding_int8_ref, _embedding_int8_fake)




def _attention_q8_fake(q, k, v, attn_mask, is_causal, scale, qdtype):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# 8-bit attention (qcompiler.ir.attention): smoothed K, Q and K per token, P per block of keys,
# V per channel, INT8 or FP8 products, softmax in float32
attention_q8 = _define("attention_q8", attention.attention_q8_ref, _attention_q8_fake)


def _attention_q8_static_fake(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale,
                              v_scale, p_scale, qdtype):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# static 8-bit attention (qcompiler.ir.attention_static): calibrated per-tensor scales, P with a
# fixed scale; the form TensorRT's explicit quantization takes
attention_q8_static = _define("attention_q8_static", attention_static.attention_q8_static_ref,
                              _attention_q8_static_fake)



def _kv_dequantize_fake(codes, scale, offset, scheme, per, group, dtype=torch.float32):
    width = codes.shape[-1] * (2 if kv.kv_format(scheme).bits == 4 else 1)
    return codes.new_empty((*codes.shape[:-1], width), dtype=dtype)


# a quantized KV cache's codes -> floating point (qcompiler.ir.kv): what the cache's compiled read
# emits, so that the attention pass can find a cache read and fuse it into the attention
kv_dequantize = _define("kv_dequantize", kv.dequantize_codes, _kv_dequantize_fake)


def _attention_quantized_kv_fake(q, k_codes, k_scale, k_offset, k_tail, v_codes, v_scale, v_offset, v_tail,
                                 attn_mask, is_causal, scale, scheme, k_group, v_group):
    return q.new_empty((*q.shape[:-1], v_tail.shape[-1]))


# floating-point attention reading a quantized KV cache's codes and tails (qcompiler.ir.kv_attention)
attention_quantized_kv = _define("attention_quantized_kv", kv_attention.attention_quantized_kv_ref,
                                 _attention_quantized_kv_fake)

# op overload (what appears in FX graphs) -> its plain-torch reference implementation
REFERENCE = {
    torch.ops.qcompile.quantize_per_token.default: quantize_per_token_ref,
    torch.ops.qcompile.quantize_per_tensor.default: quantize_per_tensor_ref,
    torch.ops.qcompile.linear_w8a8.default: linear_w8a8_ref,
    torch.ops.qcompile.linear_w8a8_blocks.default: linear_w8a8_blocks_ref,
    torch.ops.qcompile.linear_w8a16.default: linear_w8a16_ref,
    torch.ops.qcompile.linear_w4a16.default: linear_w4a16_ref,
    torch.ops.qcompile.embedding_int8.default: embedding_int8_ref,
    torch.ops.qcompile.attention_q8.default: attention.attention_q8_ref,
    torch.ops.qcompile.attention_q8_static.default: attention_static.attention_q8_static_ref,
    torch.ops.qcompile.kv_dequantize.default: kv.dequantize_codes,
    torch.ops.qcompile.attention_quantized_kv.default: kv_attention.attention_quantized_kv_ref,
}
