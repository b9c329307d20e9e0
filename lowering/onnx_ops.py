"""ONNX translations of the q-ops: one function per q-op and form, used by ``lowering.onnx``.

Two forms of the same integer math (``FORMS``):

* ``"tensorrt"``: TensorRT's explicit quantization. QuantizeLinear / DequantizeLinear pairs,
  symmetric, zero point a constant 0 of the signed type (INT8 or FP8 E4M3), weights stored
  quantized as ``[K, N]`` (the layout MatMul consumes) with per-channel scales on axis 1,
  activations per tensor with constant scales. INT4 weights are a blocked DequantizeLinear
  (opset 21, ``block_size`` along K). Dynamic per-token activations have no form here.
* ``"ort"``: what ONNX Runtime's CPU kernels run fast *and exactly*. INT8 values travel as
  uint8 with zero point 128 (``u = q + 128``): on x86 CPUs without VNNI, ORT's u8 x s8 kernels
  sum pairs of products in int16 and saturate (measured: errors of 20% of the output), while
  its u8 x u8 kernels are exact and as fast. Dynamic per-token activations are quantized by
  plain ONNX ops and multiplied with ``MatMulInteger``; INT4 weights, and INT8 weights whose
  activations are quantized per block of channels, run in ``MatMulNBits``.

Every function receives the q-op's arguments as the exporter's symbolic values, in the q-op's
own layout (``[N, K]`` weights, ``qcompiler.ir.int4`` packing); layout changes are written as ONNX
ops on the constants, which the exporter's constant folding turns into stored initializers,
so the weights are never re-quantized and no scale is re-derived here.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset21 as op
from onnxscript.values import Op, Opset

from qcompiler.ir import attention, ops

FORMS = ("tensorrt", "ort")
# The default-domain opset each form exports at. TensorRT: 21, the lowest with blocked (INT4)
# DequantizeLinear and INT4 types (FP8 Q/DQ need 19). ORT: 23, whose ``Attention`` op the exporter
# emits for scaled_dot_product_attention and ORT (>= 1.23) runs as one fused CPU kernel (MiniLM
# 8x128 FP32 kernel time 193 -> 166 ms, of which Where alone took 14 at 21:
# benchmarks/ort_profile.py). The translations below are written to opset 21 and mean the same at 23.
OPSETS = {"tensorrt": 21, "ort": 23}
OPSET = OPSETS["tensorrt"]
qops = torch.ops.qcompile

_QTYPES = {torch.int8: ir.DataType.INT8, ops.FP8: ir.DataType.FLOAT8E4M3FN,
           ir.DataType.INT8: ir.DataType.INT8, ir.DataType.FLOAT8E4M3FN: ir.DataType.FLOAT8E4M3FN}


_NUMPY = {ir.DataType.INT8: np.int8, ir.DataType.FLOAT8E4M3FN: ml_dtypes.float8_e4m3fn,
          ir.DataType.INT4: ml_dtypes.int4, ir.DataType.UINT4: ml_dtypes.uint4}


def _contrib_schema(name: str, inputs: list, attributes: list):
    """An ``OpSchema`` for an ONNX Runtime contrib op (onnx's registry does not know them)."""
    from onnx.defs import OpSchema

    fp = OpSchema.FormalParameter
    opt = OpSchema.FormalParameterOption.Optional
    return OpSchema(
        name, "com.microsoft", 1,
        inputs=[fp(n, t, param_option=opt) if optional else fp(n, t) for n, t, optional in inputs],
        outputs=[fp("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, "") for a in attributes])


MatMulIntegerToFloat = Op(Opset("com.microsoft", 1), "MatMulIntegerToFloat", _contrib_schema(
    "MatMulIntegerToFloat", [("A", "T2", False), ("B", "T2", False), ("a_scale", "T1", False), ("b_scale", "T1", False),
                             ("a_zero_point", "T2", True), ("b_zero_point", "T2", True), ("bias", "T1", True)], []))
MatMulNBits = Op(Opset("com.microsoft", 1), "MatMulNBits", _contrib_schema(
    "MatMulNBits", [("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True)],
    ["K", "N", "bits", "block_size", "accuracy_level"]))


class UnsupportedForm(ValueError):
    """A q-op that has no translation in the requested ONNX form (the message says what to use)."""


def _qtype(qdtype) -> ir.DataType:
    return _QTYPES[ir.DataType.INT8 if qdtype is None else qdtype]


def _const(value, dtype) -> ir.Value:
    return op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))


def _zero(qtype: ir.DataType, n: int = 0):
    """Constant zero point 0 of ``qtype`` (scalar, or ``[n]`` for per-axis scales)."""
    return _const(np.zeros(() if n == 0 else (n,)), _NUMPY[qtype])


def _smoothed(x, smooth_inv):
    return x if smooth_inv is None else op.Mul(x, smooth_inv)


def _bias(y, bias):
    return y if bias is None else op.Add(y, bias)


def _out(y, out_dtype):
    return y if out_dtype in (None, ir.DataType.FLOAT, torch.float32) else op.Cast(y, to=_ir_float(out_dtype))


def _ir_float(dtype) -> ir.DataType:
    table = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16, torch.bfloat16: ir.DataType.BFLOAT16}
    return table.get(dtype, dtype)


def _is_fp8(qtype) -> bool:
    return qtype == ir.DataType.FLOAT8E4M3FN


# ----------------------------------------------------------------------------- tensorrt form


def trt_quantize_per_tensor(x, scale, smooth_inv=None, qdtype=None):
    qtype = _qtype(qdtype)
    return op.QuantizeLinear(_smoothed(x, smooth_inv), scale, _zero(qtype))


def trt_quantize_per_token(x, smooth_inv=None, qdtype=None):
    raise UnsupportedForm(
        "dynamic per-token activation quantization has no TensorRT explicit-quantization form "
        "(TensorRT needs constant per-tensor activation scales): export a static recipe "
        "(w8a8-static, w8a8-smoothquant, fp8-static) for TensorRT, or use form='ort' for ONNX Runtime")


def trt_linear_w8a8_blocks(x, smooth_inv, wq, w_scale, bias, block_size, out_dtype):
    raise UnsupportedForm(
        "activation quantization per block of channels (w8a8-blocks) has no TensorRT explicit-quantization "
        "form (TensorRT needs constant per-tensor activation scales): export a static recipe "
        "(w8a8-static, w8a8-smoothquant, fp8-static) for TensorRT, or use form='ort' for ONNX Runtime")


def _trt_weight(wq, w_scale):
    """``[N, K]`` 8-bit weight -> DequantizeLinear of its ``[K, N]`` transpose, per channel on axis 1."""
    qtype = ir.DataType.FLOAT8E4M3FN if wq.dtype == ir.DataType.FLOAT8E4M3FN else ir.DataType.INT8
    n = wq.shape[0]
    return op.DequantizeLinear(op.Transpose(wq, perm=[1, 0]), w_scale, _zero(qtype, n), axis=1)


def trt_linear_w8a8(xq, x_scale, wq, w_scale, bias, out_dtype):
    qtype = ir.DataType.FLOAT8E4M3FN if wq.dtype == ir.DataType.FLOAT8E4M3FN else ir.DataType.INT8
    x = op.DequantizeLinear(xq, x_scale, _zero(qtype))
    return _out(_bias(op.MatMul(x, _trt_weight(wq, w_scale)), bias), out_dtype)


def linear_w8a16(x, wq, w_scale, bias):
    w = op.CastLike(_trt_weight(wq, w_scale), x)
    return _bias(op.MatMul(x, w), op.CastLike(bias, x) if bias is not None else None)


def _int4_codes_kn(packed, zero, in_features: int, signed: bool):
    """Packed ``[N, Kp/2]`` nibbles -> ``[K, N]`` codes (uint4, or int4 = code - 8 when symmetric)."""
    low = op.BitwiseAnd(packed, _const(15, np.uint8))
    high = op.BitShift(packed, _const(4, np.uint8), direction="RIGHT")
    codes = op.Reshape(op.Concat(op.Unsqueeze(low, _const([-1], np.int64)),
                                 op.Unsqueeze(high, _const([-1], np.int64)), axis=-1),
                       _const([0, -1], np.int64))
    codes = op.Slice(codes, _const([0], np.int64), _const([in_features], np.int64), _const([1], np.int64))
    if signed:
        codes = op.Cast(op.Sub(op.Cast(codes, to=ir.DataType.INT16), _const(8, np.int16)), to=ir.DataType.INT4)
    else:
        codes = op.Cast(codes, to=ir.DataType.UINT4)
    return op.Transpose(codes, perm=[1, 0])


def trt_linear_w4a16(x, packed, scale, zero, smooth_inv, group_size, bias):
    """Blocked DequantizeLinear (opset 21) of ``[K, N]`` INT4 codes, blocks of ``group_size`` along K."""
    in_features = x.shape[-1]
    if not isinstance(in_features, int):
        raise UnsupportedForm("linear_w4a16 needs a static input feature size to export")
    k_groups = -(-in_features // group_size)
    signed = zero is None
    codes = _int4_codes_kn(packed, zero, in_features, signed)
    scale_kn = op.Transpose(scale, perm=[1, 0])                       # [G, N]
    zp = (_const(np.zeros((k_groups, packed.shape[0])), ml_dtypes.int4) if signed
          else op.Cast(op.Transpose(zero, perm=[1, 0]), to=ir.DataType.UINT4))
    w = op.CastLike(op.DequantizeLinear(codes, scale_kn, zp, axis=0, block_size=group_size), x)
    y = op.MatMul(_smoothed(x, smooth_inv), w)
    return _bias(y, op.CastLike(bias, x) if bias is not None else None)


def trt_embedding_int8(indices, wq, w_scale, out_dtype):
    """The table dequantized per row (constant scales, as TensorRT takes them), then gathered."""
    table = op.DequantizeLinear(wq, w_scale, _zero(ir.DataType.INT8, wq.shape[0]), axis=0)
    return _out(op.Gather(table, indices, axis=0), out_dtype)


def dequantize(q, scale):
    shifted = q.dtype == ir.DataType.UINT8  # the ort form's int8 + 128
    q = op.Cast(q, to=ir.DataType.FLOAT)
    return op.Mul(op.Sub(q, _const(float(_U8_ZERO), np.float32)) if shifted else q, scale)


# ----------------------------------------------------------------------------- ort form
# INT8 values are carried as uint8 = int8 + 128 (see the module docstring).

_U8_ZERO = 128


def ort_quantize_per_tensor(x, scale, smooth_inv=None, qdtype=None):
    qtype = _qtype(qdtype)
    if _is_fp8(qtype):
        return trt_quantize_per_tensor(x, scale, smooth_inv, qdtype)
    return op.QuantizeLinear(_smoothed(x, smooth_inv), scale, _const(_U8_ZERO, np.uint8))


def _token_scale(xs, qmax: float):
    """Each row's scale, ``max(amax, MIN_AMAX) / qmax``, NaN for a row holding NaN or Inf."""
    amax = op.Max(op.ReduceMax(op.Abs(xs), _const([-1], np.int64), keepdims=1), _const(ops._MIN_AMAX, np.float32))
    # ONNX Runtime's ReduceMax and Max skip NaN; the reference's row scale is NaN for a row holding
    # NaN (or Inf - Inf), so the row's output is too: a row sum times zero carries it (one more pass
    # over the activation, read alongside the ReduceMax's)
    amax = op.Add(amax, op.Mul(op.ReduceSum(xs, _const([-1], np.int64), keepdims=1), _const(0.0, np.float32)))
    return op.Div(amax, _const(qmax, np.float32))


def ort_quantize_per_token(x, smooth_inv=None, qdtype=None):
    qtype = _qtype(qdtype)
    xs = _smoothed(op.Cast(x, to=ir.DataType.FLOAT), smooth_inv)
    scale = _token_scale(xs, ops.QMAXES[ops.FP8 if _is_fp8(qtype) else torch.int8])
    if _is_fp8(qtype):
        limit = ops.QMAXES[ops.FP8]
        q = op.Cast(op.Clip(op.Div(xs, scale), _const(-limit, np.float32), _const(limit, np.float32)), to=qtype)
        return q, scale
    k = x.shape[-1]
    if not isinstance(k, int):
        raise UnsupportedForm("quantize_per_token needs a static feature size to export")
    # one blocked QuantizeLinear (opset 21) whose block is a whole token row, where Div, Round,
    # Clip, Add and Cast took five passes; same math (x / scale, round half to even, saturate,
    # + 128). It replaced per-axis scales on a 2-D view of the rows: the blocked form runs
    # 1.1-2.4x faster (benchmarks/ort_int8_kernels.py) and needs none of the view's Reshapes
    zero = op.Expand(_const(_U8_ZERO, np.uint8), op.Shape(scale))
    return op.QuantizeLinear(xs, scale, zero, axis=-1, block_size=k), scale


def _u8(wq):
    """int8 codes -> uint8 (+128), folded to an initializer at export."""
    return op.Cast(op.Add(op.Cast(wq, to=ir.DataType.INT16), _const(_U8_ZERO, np.int16)), to=ir.DataType.UINT8)


def _u8_weight_kn(wq):
    """``[N, K]`` int8 -> ``[K, N]`` uint8 (+128), folded to an initializer at export."""
    return op.Transpose(_u8(wq), perm=[1, 0])


def ort_linear_w8a8(xq, x_scale, wq, w_scale, bias, out_dtype):
    if wq.dtype == ir.DataType.FLOAT8E4M3FN:  # no FP8 GEMM on ORT's CPU: dequantize, float MatMul
        x = op.Mul(op.Cast(xq, to=ir.DataType.FLOAT), x_scale)  # the scale may be per token
        return _out(_bias(op.MatMul(x, _trt_weight(wq, w_scale)), bias), out_dtype)
    zp = _const(_U8_ZERO, np.uint8)
    if len(x_scale.shape) == 0:  # static per-tensor: the dequantize and bias in the GEMM's epilogue
        y = MatMulIntegerToFloat(xq, _u8_weight_kn(wq), x_scale, w_scale, zp, zp, *(() if bias is None else (bias,)))
        return _out(y, out_dtype)
    # per-token scales: MatMulIntegerToFloat takes only a scalar activation scale (ORT 1.32 returns
    # wrong results when it is given, or fuses itself, a per-row one: tests/unit/test_onnx.py), so it
    # applies the weight scales in its epilogue with an activation scale of 1, and one Mul applies
    # the token scales (one pass over the output where Cast, Mul, Mul took three)
    one = _const(1.0, np.float32)
    y = op.Mul(MatMulIntegerToFloat(xq, _u8_weight_kn(wq), one, w_scale, zp, zp), x_scale)
    return _out(_bias(y, bias), out_dtype)


# At most this many rows (a static count: a decode step) run ``MatMulNBits``' per-block int8
# activations. At more, the two per-token passes of ``ops.quantize_two_pass_ref`` through
# ``MatMulIntegerToFloat`` are faster (SmolLM2's five shapes: ``MatMulNBits`` faster on all at 4
# rows, the two passes on all at 16 and 256), and at 256 rows ``MatMulNBits`` is slower than the
# float GEMM (10.9 against 7.7 ms over a layer's four GEMMs; the two passes 6.3 ms):
# docs/results/cpu_decode_kernels_xeon_amx.md
BLOCK_KERNEL_MAX_ROWS = 4


def _static_rows(x):
    """The row count of ``x`` (all but its last dimension) where every size is static, else None."""
    sizes = list(x.shape)[:-1]
    return int(np.prod(sizes)) if all(isinstance(d, int) for d in sizes) else None


def ort_linear_w8a8_blocks(x, smooth_inv, wq, w_scale, bias, block_size, out_dtype):
    """A few static rows (a decode step): ONNX Runtime's ``MatMulNBits`` with 8-bit weights at
    accuracy level 4. It quantizes its float input to int8 itself, symmetric, one scale per block
    of ``block_size`` input channels (zeros padding a short last block), the q-op's own rounding
    (tests/unit/test_linear_blocks.py), and takes the int8 dot products of each block. The
    weights' codes go in as uint8 blocks with ``MatMulNBits``' default 8-bit zero point 128, each
    channel's scale repeated per block. ``MatMulNBits`` drops a NaN of its input (it returns
    finite outputs for a NaN row): the row times a zero column, added to the output, carries it
    as the reference does.

    More rows, or a dynamic count (prefill, encoders): ``_two_pass_gemm``, which rounds every
    product at least as finely as the per-block reference."""
    n, k = wq.shape[0], x.shape[-1]
    if not isinstance(k, int) or not isinstance(n, int):
        raise UnsupportedForm("linear_w8a8_blocks needs static feature sizes to export")
    xs = _smoothed(op.Cast(x, to=ir.DataType.FLOAT), smooth_inv)
    rows = _static_rows(x)
    if rows is None or rows > BLOCK_KERNEL_MAX_ROWS:
        return _out(_bias(_two_pass_gemm(xs, wq, w_scale), bias), out_dtype)
    if block_size < 16 or block_size & (block_size - 1):
        raise UnsupportedForm(f"MatMulNBits takes blocks of a power of two >= 16 channels, got {block_size}")
    blocks = -(-k // block_size)
    padded = op.Pad(_u8(wq), _const([0, 0, 0, blocks * block_size - k], np.int64), _const(_U8_ZERO, np.uint8))
    codes = op.Reshape(padded, _const([n, blocks, block_size], np.int64))
    scales = op.Reshape(op.Expand(op.Unsqueeze(w_scale, _const([1], np.int64)), _const([n, blocks], np.int64)),
                        _const([-1], np.int64))
    y = MatMulNBits(xs, codes, scales, K=k, N=n, bits=8, block_size=block_size, accuracy_level=4)
    y = op.Add(y, op.MatMul(xs, _const(np.zeros((k, 1)), np.float32)))
    return _out(_bias(y, bias), out_dtype)


def _two_pass_gemm(xs, wq, w_scale):
    """``ops.quantize_two_pass_ref``'s codes of ``xs`` (stored as uint8 + 128; the residual divided
    by the float nearest 1/254 where the reference multiplies by 254, which may round a tie the other
    way) through two ``MatMulIntegerToFloat``s of one weight, the second with activation scale 1/254;
    their sum times the token scales."""
    scale = _token_scale(xs, ops.QMAX)
    t = op.Div(xs, scale)
    one, zp, fine = _const(1.0, np.float32), _const(_U8_ZERO, np.uint8), _const(1 / ops.TWO_PASS_FINE, np.float32)
    # hi = round(t) as a QuantizeLinear of scale 1 (half to even, as the reference), t - hi through
    # its DequantizeLinear, and that residual's codes on the grid 1/254: five passes over the
    # activation where Div, Round, Sub, Mul, Round and two QuantizeLinear took seven (Round is one of
    # ONNX Runtime's slowest elementwise kernels)
    hi = op.QuantizeLinear(t, one, zp)
    lo = op.QuantizeLinear(op.Sub(t, op.DequantizeLinear(hi, one, zp)), fine, zp)
    weight = _u8_weight_kn(wq)
    high = MatMulIntegerToFloat(hi, weight, one, w_scale, zp, zp)
    low = MatMulIntegerToFloat(lo, weight, fine, w_scale, zp, zp)
    return op.Mul(op.Add(high, low), scale)


def ort_linear_w8a16(x, wq, w_scale, bias):
    """INT8 weights stored, dequantized once by ORT's constant folding when the session loads:
    no ORT kernel multiplies INT8 weights by float activations both exactly and faster than its
    float GEMM (benchmarks/cpu_speed.py; docs/experiments.md, "ONNX export"). The ``ort`` target's
    own sessions run these GEMMs on the stored codes instead (``onnx_decode_gemv`` at one row,
    ``onnx_weight_only_int8`` at more, where the CPU's u8 x s8 product is exact)."""
    w = op.Mul(op.Cast(op.Transpose(wq, perm=[1, 0]), to=ir.DataType.FLOAT), w_scale)
    return _bias(op.MatMul(x, op.CastLike(w, x)), op.CastLike(bias, x) if bias is not None else None)


def ort_embedding_int8(indices, wq, w_scale, out_dtype):
    """Only the gathered rows are dequantized, each by its own gathered scale."""
    rows = op.Cast(op.Gather(wq, indices, axis=0), to=ir.DataType.FLOAT)
    return _out(op.Mul(rows, op.Unsqueeze(op.Gather(w_scale, indices, axis=0), _const([-1], np.int64))), out_dtype)


def ort_linear_w4a16(x, packed, scale, zero, smooth_inv, group_size, bias):
    """ONNX Runtime's ``MatMulNBits``: it reads ``qcompiler.ir.int4``'s packing as is."""
    n, k = packed.shape[0], x.shape[-1]
    if not isinstance(k, int):
        raise UnsupportedForm("linear_w4a16 needs a static input feature size to export")
    k_groups = -(-k // group_size)
    blob = op.Reshape(packed, _const([n, k_groups, group_size // 2], np.int64))
    same = x.dtype is not None and x.dtype == scale.dtype  # no cast in or out (one node each per linear)
    x_in = _smoothed(x, smooth_inv)
    inputs = [x_in if same else op.CastLike(x_in, scale), blob, op.Reshape(scale, _const([-1], np.int64))]
    if zero is not None:
        # MatMulNBits packs 4-bit zero points two per byte, low nibble first, per row
        padded = op.Pad(zero, _const([0, 0, 0, k_groups % 2], np.int64))
        pairs = op.Reshape(padded, _const([n, -1, 2], np.int64))
        lo = op.Squeeze(op.Slice(pairs, _const([0], np.int64), _const([1], np.int64), _const([2], np.int64)), _const([2], np.int64))
        hi = op.Squeeze(op.Slice(pairs, _const([1], np.int64), _const([2], np.int64), _const([2], np.int64)), _const([2], np.int64))
        inputs.append(op.Reshape(op.BitwiseOr(lo, op.BitShift(hi, _const(4, np.uint8), direction="LEFT")),
                                 _const([-1], np.int64)))
    y = _bias(MatMulNBits(*inputs, K=k, N=n, bits=4, block_size=group_size), bias)
    return y if same else op.CastLike(y, x)


# ----------------------------------------------------------------------------- attention (both forms)


def _static(value, what: str) -> int:
    if not isinstance(value, int):
        raise UnsupportedForm(f"attention_q8 needs a static {what} to export")
    return value


def _repeat_heads(t, like, heads: int):
    """``[B, Hkv, L, D]`` -> ``[B, heads, L, D]``, each key/value head read by ``heads / Hkv`` query
    heads (``like``: the graph input ``t`` was cast from, whose shape the exporter knows)."""
    hkv, d = _static(like.shape[1], "number of key/value heads"), _static(like.shape[3], "head size")
    if hkv == heads:
        return t
    shape = op.Shape(t)
    target = op.Concat(op.Slice(shape, _const([0], np.int64), _const([2], np.int64)), _const([heads // hkv], np.int64),
                       op.Slice(shape, _const([2], np.int64), _const([4], np.int64)), axis=0)
    return op.Reshape(op.Expand(op.Unsqueeze(t, _const([2], np.int64)), target), _const([0, heads, -1, d], np.int64))


def _codes(x, scale, qtype):
    """``x / scale`` rounded to ``qtype``'s grid, carried as float32 (exact small integers, or FP8 values)."""
    if _is_fp8(qtype):
        limit = ops.QMAXES[ops.FP8]
        y = op.Clip(op.Div(x, scale), _const(-limit, np.float32), _const(limit, np.float32))
        return op.Cast(op.Cast(y, to=qtype), to=ir.DataType.FLOAT)
    return op.Clip(op.Round(op.Div(x, scale)), _const(float(ops.QMIN), np.float32), _const(float(ops.QMAX), np.float32))


def _amax_scale(x, axis: int, qmax: float):
    amax = op.ReduceMax(op.Abs(x), _const([axis], np.int64), keepdims=1)
    return op.Div(op.Max(amax, _const(ops._MIN_AMAX, np.float32)), _const(qmax, np.float32))


def _masked(scores, attn_mask, is_causal):
    """Float32 scores plus the mask (boolean: True attends; or additive) and the causal mask."""
    neg = _const(float("-inf"), np.float32)
    if attn_mask is not None:
        scores = (op.Add(scores, op.Where(attn_mask, _const(0.0, np.float32), neg)) if attn_mask.dtype == ir.DataType.BOOL
                  else op.Add(scores, op.Cast(attn_mask, to=ir.DataType.FLOAT)))
    if is_causal:
        lengths = op.Slice(op.Shape(scores), _const([2], np.int64), _const([4], np.int64))
        keep = op.Cast(op.Trilu(op.Expand(_const(1, np.int64), lengths), upper=0), to=ir.DataType.BOOL)
        scores = op.Add(scores, op.Where(keep, _const(0.0, np.float32), neg))
    return scores


def ort_attention_q8(q, k, v, attn_mask, is_causal, scale, qdtype):
    """``qcompile::attention_q8`` as plain ONNX ops (``qcompiler.ir.attention``): the scales are
    computed at run time, the two products are float MatMuls of the 8-bit values (exact for
    Q K^T up to head size 1024; P V rounds only by float32 accumulation)."""
    qtype = _qtype(qdtype)
    qmax = ops.QMAXES[ops.FP8 if _is_fp8(qtype) else torch.int8]
    heads, d = _static(q.shape[1], "number of query heads"), _static(q.shape[3], "head size")
    scale = d ** -0.5 if scale is None else float(scale)
    qf = op.Cast(q, to=ir.DataType.FLOAT)
    kf = _repeat_heads(op.Cast(k, to=ir.DataType.FLOAT), k, heads)
    vf = _repeat_heads(op.Cast(v, to=ir.DataType.FLOAT), v, heads)
    kf = op.Sub(kf, op.ReduceMean(kf, _const([-2], np.int64), keepdims=1))     # K smoothing
    int8, qk_max = ir.DataType.INT8, ops.QMAXES[torch.int8]                   # Q and K: INT8 per token
    sq, sk = _amax_scale(qf, -1, qk_max), _amax_scale(kf, -1, qk_max)
    scores = op.MatMul(_codes(qf, sq, int8), op.Transpose(_codes(kf, sk, int8), perm=[0, 1, 3, 2]))
    scores = op.Mul(op.Mul(scores, op.Mul(sq, _const(scale, np.float32))), op.Transpose(sk, perm=[0, 1, 3, 2]))
    scores = _masked(scores, attn_mask, is_causal)
    m = op.ReduceMax(scores, _const([-1], np.int64), keepdims=1)
    live = op.Not(op.IsInf(m, detect_positive=0))            # a row with every key masked gives zeros
    p = op.Exp(op.Sub(scores, op.Where(live, m, _const(0.0, np.float32))))
    total = op.ReduceSum(p, _const([-1], np.int64), keepdims=1)
    sv = _amax_scale(vf, -2, qmax)                                             # V per channel
    block = attention.P_BLOCK                                                  # P per block of keys
    lk = op.Slice(op.Shape(p), _const([3], np.int64), _const([4], np.int64))
    pad = op.Mod(op.Sub(_const([block], np.int64), op.Mod(lk, _const([block], np.int64))), _const([block], np.int64))
    zeros = _const([0, 0, 0, 0, 0, 0, 0], np.int64)
    p_blocks = op.Reshape(op.Pad(p, op.Concat(zeros, pad, axis=0)), _const([0, 0, 0, -1, block], np.int64))
    ps = op.Div(op.ReduceMax(p_blocks, _const([-1], np.int64), keepdims=1), _const(qmax, np.float32))
    safe = op.Where(op.Greater(ps, _const(0.0, np.float32)), ps, _const(1.0, np.float32))
    pq = op.Transpose(_codes(p_blocks, safe, qtype), perm=[0, 1, 3, 2, 4])    # [B, H, nb, Lq, block]
    v_pad = op.Concat(_const([0, 0, 0, 0, 0, 0], np.int64), pad, _const([0], np.int64), axis=0)
    v_blocks = op.Reshape(op.Pad(_codes(vf, sv, qtype), v_pad), _const([0, 0, -1, block, d], np.int64))
    per_block = op.Mul(op.MatMul(pq, v_blocks), op.Transpose(ps, perm=[0, 1, 3, 2, 4]))
    out = op.Div(op.Mul(op.ReduceSum(per_block, _const([2], np.int64), keepdims=0), sv), total)
    return op.CastLike(op.Where(live, out, _const(0.0, np.float32)), q)


def trt_attention_q8(q, k, v, attn_mask, is_causal, scale, qdtype):
    raise UnsupportedForm(
        "8-bit attention on a dynamic-activation recipe computes its Q, K and V scales at run time, and "
        "TensorRT's explicit quantization needs constant scales: export a static recipe (w8a8-smoothquant, "
        "w8a8-static, fp8-static) with attention set, whose attention scales are calibrated constants, "
        "or use form='ort' for ONNX Runtime")


def _qdq(x, scale, qtype):
    """QuantizeLinear -> DequantizeLinear with a per-tensor scale: the explicit-quantization pair."""
    zero = _zero(qtype)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale, zero)


def _nan_carrier(a, b, b_axis: int):
    """``qcompiler.ir.attention_static.nan_carrier``: zeros ``[.., M, 1] + [.., 1, N]``, NaN where
    a row of ``a`` (over its last axis) or of ``b`` (over ``b_axis``) holds NaN."""
    zero = _const(0.0, np.float32)
    rows = op.Mul(op.ReduceSum(a, _const([-1], np.int64), keepdims=1), zero)
    cols = op.Mul(op.ReduceSum(b, _const([b_axis], np.int64), keepdims=1), zero)
    return op.Add(rows, cols if b_axis == -2 else op.Transpose(cols, perm=[0, 1, 3, 2]))


def _attention_q8_static(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale, v_scale,
                         p_scale, qdtype, carry_nan: bool):
    """``qcompile::attention_q8_static`` (``qcompiler.ir.attention_static``): Q/DQ pairs with the
    calibrated constant scales on the inputs of the two batched MatMuls, with the scale, the mask
    and the softmax between them (the pattern TensorRT fuses into one attention kernel; ONNX
    Runtime runs it as written). ``carry_nan``: the reference's NaN carrier on the scores (the
    ORT form; TensorRT's form keeps the bare pattern)."""
    qtype, int8 = _qtype(qdtype), ir.DataType.INT8
    heads, d = _static(q.shape[1], "number of query heads"), _static(q.shape[3], "head size")
    scale = d ** -0.5 if scale is None else float(scale)
    qs = op.Mul(op.Cast(q, to=ir.DataType.FLOAT), q_mul)
    ks = _repeat_heads(op.Mul(op.Sub(op.Cast(k, to=ir.DataType.FLOAT), k_shift), k_mul), k, heads)
    vf = _repeat_heads(op.Cast(v, to=ir.DataType.FLOAT), v, heads)
    scores = op.Mul(op.MatMul(_qdq(qs, q_scale, int8), op.Transpose(_qdq(ks, k_scale, int8), perm=[0, 1, 3, 2])),
                    _const(scale, np.float32))
    if carry_nan:
        scores = op.Add(scores, _nan_carrier(qs, ks, -1))
    scores = _masked(scores, attn_mask, is_causal)
    p = op.Softmax(scores, axis=-1)
    out = op.MatMul(_qdq(p, p_scale, qtype), _qdq(vf, v_scale, qtype))
    if carry_nan:
        out = op.Add(out, _nan_carrier(p, vf, -2))
    if attn_mask is not None or is_causal:  # a row with every key masked gives zeros
        live = op.Not(op.IsInf(op.ReduceMax(scores, _const([-1], np.int64), keepdims=1), detect_positive=0))
        out = op.Where(live, out, _const(0.0, np.float32))
    return op.CastLike(out, q)


def trt_attention_q8_static(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale, v_scale, p_scale, qdtype):
    return _attention_q8_static(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale, v_scale, p_scale,
                                qdtype, carry_nan=False)


def ort_attention_q8_static(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale, v_scale, p_scale, qdtype):
    return _attention_q8_static(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale, v_scale, p_scale,
                                qdtype, carry_nan=True)


TRANSLATIONS = {
    "tensorrt": {
        qops.quantize_per_tensor.default: trt_quantize_per_tensor,
        qops.quantize_per_token.default: trt_quantize_per_token,
        qops.linear_w8a8.default: trt_linear_w8a8,
        qops.linear_w8a8_blocks.default: trt_linear_w8a8_blocks,
        qops.linear_w8a16.default: linear_w8a16,
        qops.linear_w4a16.default: trt_linear_w4a16,
        qops.embedding_int8.default: trt_embedding_int8,
        qops.attention_q8.default: trt_attention_q8,
        qops.attention_q8_static.default: trt_attention_q8_static,
    },
    "ort": {
        qops.quantize_per_tensor.default: ort_quantize_per_tensor,
        qops.quantize_per_token.default: ort_quantize_per_token,
        qops.linear_w8a8.default: ort_linear_w8a8,
        qops.linear_w8a8_blocks.default: ort_linear_w8a8_blocks,
        qops.linear_w8a16.default: ort_linear_w8a16,
        qops.linear_w4a16.default: ort_linear_w4a16,
        qops.embedding_int8.default: ort_embedding_int8,
        qops.attention_q8.default: ort_attention_q8,
        qops.attention_q8_static.default: ort_attention_q8_static,
    },
}
