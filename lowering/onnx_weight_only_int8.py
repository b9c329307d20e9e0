"""Many-row weight-only INT8 GEMMs as two per-token int8 passes: an ORT-form rewrite for the host.

A ``w8a16`` linear of the ``ort`` form (and a language model's ``lm_head`` reading an INT8
embedding table) is a float ``MatMul`` of its dequantized weight ``Mul(Cast(codes), scales)``. ONNX
Runtime folds that weight into a float32 copy when the session loads: the session holds four bytes
per weight, and a prompt or an encoder batch runs the float GEMM. Over one row
``lowering.onnx_decode_gemv`` already takes the stored codes (``MatMulNBits``). Over more rows, or
a row count known only at run time, this rewrite runs the GEMM on the codes too, as the ``ort``
form's prompts of ``w8a8-blocks`` do: each token is quantized twice (``ops.quantize_two_pass_ref``:
``hi = round(x / s)``, then what that rounding left, ``lo = round((x / s - hi) * 254)``, with the
per-token ``s = amax / 127``), and both int8 halves go through ``MatMulIntegerToFloat`` with the
weights' per-channel scales in its epilogue; their sum times ``s`` is the output.

Each activation is then carried within ``s / 508`` of its value (about 15 bits per token where a
bfloat16 activation has 8 of mantissa), so the output is the float-activation linear's within a
rounding far below the weights' own (tests/unit/test_onnx_host_kernels.py checks it against
float64 and against ``ops.linear_w8a8_two_pass_ref``). The integer GEMMs read the INT8 codes the
file stores, so no float32 copy of the weights is made (SmolLM2-135M: 101 MiB of codes where the
float GEMMs expanded 405 MiB). Alone, on SmolLM2's shapes, the two passes ran 1.2x as fast as the
float GEMM over a layer at 256 rows and faster on every shape at 4 and 16 rows
(docs/results/cpu_decode_kernels_xeon_amx.md); inside whole models, with their quantization, they
take the float GEMM's time within 1.3% (docs/results/weight_only_prompt_kernels_xeon_amx.md).
That holds for the u8 x s8 kernel only: the rewrite is made where ``runtimes.ort_int8_probe`` finds
that product exact on this CPU (VNNI), and ``lowering.onnx_signed_weights`` then stores the weights
signed; elsewhere the float GEMM stays.

The linears that read one activation share its quantization and one pair of GEMMs (their weights
side by side, as ``lowering.onnx_sibling_matmuls`` merges the integer GEMMs). A row holding NaN
or Inf gets a NaN scale (its sum times zero), so every output of that row is NaN, as in the
reference.
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir

from qcompiler.ir.numerics import MIN_AMAX, QMAX
from qcompiler.ir.ops import TWO_PASS_FINE
from qcompiler.lowering.onnx_decode_gemv import MAX_ROWS, dequantized_weight, rows_of
from qcompiler.runtimes.ort_int8_probe import signed_weights_exact

_U8_ZERO = 128
_PREFIX = "_qc_two_pass"


class _Constants:
    """The rewrite's constants by name, each made once per graph (the scalars every pair of GEMMs
    shares, and each pair's weights, scales and split widths)."""

    def __init__(self, graph: ir.Graph):
        self.graph = graph

    def __call__(self, name: str, array: np.ndarray) -> ir.Value:
        name = f"{_PREFIX}_{name}"
        value = self.graph.initializers.get(name)
        if value is None:
            tensor = ir.tensor(array)
            value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape),
                             const_value=tensor)
            self.graph.register_initializer(value)
        return value


def _node(op: str, inputs: list, nodes: list, tag: str, domain: str = "", **attributes) -> ir.Value:
    """Append an ``op`` node to ``nodes`` (named ``tag`` and its place there); its output."""
    attrs = [ir.AttrInt64(k, v) for k, v in attributes.items()]
    node = ir.Node(domain, op, inputs, attrs, name=f"{_PREFIX}_{tag}_{len(nodes)}_{op}")
    nodes.append(node)
    return node.outputs[0]


def _codes(x: ir.Value, const: _Constants, tag: str) -> tuple:
    """(nodes, uint8 codes of ``hi``, uint8 codes of ``lo``, token scales) of ``x``: the per-token
    scale as the ort form's ``_token_scale`` makes it, ``t = x / s``, then ``hi`` by a per-tensor
    ``QuantizeLinear`` of scale 1 (``round(t)``, half to even, as the reference rounds), ``t - hi``
    through its ``DequantizeLinear``, and that residual's codes on the grid ``1 / 254``: five passes
    over the activation where ``Div``, ``Round``, ``Sub``, ``Mul``, ``Round`` and two
    ``QuantizeLinear`` took seven (``Round`` is among ONNX Runtime's slowest elementwise kernels).
    ``lo`` is the reference's ``round((t - hi) * 254)`` but for a division by the float nearest
    ``1 / 254`` at a tie."""
    nodes: list = []
    f32 = lambda name, v: const(name, np.asarray(v, np.float32))
    axes = const("axes", np.asarray([-1], np.int64))
    amax = _node("Max", [_node("ReduceMax", [_node("Abs", [x], nodes, tag), axes], nodes, tag, keepdims=1),
                         f32("min_amax", MIN_AMAX)], nodes, tag)
    # ONNX Runtime's ReduceMax skips NaN: the row's sum times zero makes the scale NaN, as the reference's
    carrier = _node("Mul", [_node("ReduceSum", [x, axes], nodes, tag, keepdims=1), f32("zero", 0.0)], nodes, tag)
    scale = _node("Div", [_node("Add", [amax, carrier], nodes, tag), f32("qmax", float(QMAX))], nodes, tag)
    t = _node("Div", [x, scale], nodes, tag)
    one, zero = f32("one", 1.0), const("u8_zero", np.asarray(_U8_ZERO, np.uint8))
    hi = _node("QuantizeLinear", [t, one, zero], nodes, tag)
    residual = _node("Sub", [t, _node("DequantizeLinear", [hi, one, zero], nodes, tag)], nodes, tag)
    lo = _node("QuantizeLinear", [residual, f32("fine_inverse", 1 / TWO_PASS_FINE), zero], nodes, tag)
    return nodes, hi, lo, scale


def _candidate(node: ir.Node):
    """(activation, int8 codes [K, N], scales) of a many-row float ``MatMul`` of a dequantized
    INT8 weight, else None."""
    if (node.domain, node.op_type) not in (("", "MatMul"), ("ai.onnx", "MatMul")) or len(node.inputs) != 2:
        return None
    x = node.inputs[0]
    if x is None or x.dtype != ir.DataType.FLOAT or x.shape is None or x.shape.rank() < 2:
        return None
    rows = rows_of(x)
    found = dequantized_weight(node.inputs[1])
    if (rows is not None and rows <= MAX_ROWS) or found is None or x.shape[-1] != found[0].shape[0]:
        return None
    return x, *found


def two_pass_weight_only_int8(model: ir.Model) -> int:
    """Rewrite every many-row float ``MatMul`` of a dequantized INT8 weight in ``model``'s main graph
    into the two passes where this CPU's u8 x s8 product is exact; returns how many were rewritten
    (the dequantized weights they leave unused are for the caller's unused-node pass). The GEMMs
    that read one activation become one pair, their weights side by side; the sum of the pair and
    the token scales apply once, before a ``Split`` gives each linear its part."""
    groups: dict = {}
    for node in model.graph:
        found = _candidate(node)
        if found is not None:
            groups.setdefault(id(found[0]), []).append((node, *found))
    if not groups or not signed_weights_exact()[0]:
        return 0
    graph, const = model.graph, _Constants(model.graph)
    zero, one = const("u8_zero", np.asarray(_U8_ZERO, np.uint8)), const("one", np.asarray(1.0, np.float32))
    inverse = const("fine_inverse", np.asarray(1 / TWO_PASS_FINE, np.float32))
    for index, group in enumerate(groups.values()):
        first, x = group[0][0], group[0][1]
        tag = f"x{index}"
        nodes, hi, lo, scale = _codes(x, const, tag)
        widths = [codes.shape[1] for _, _, codes, _ in group]
        codes = np.concatenate([codes for _, _, codes, _ in group], axis=1)
        unsigned = (codes.astype(np.int16) + _U8_ZERO).astype(np.uint8)
        w_scale = np.concatenate([np.broadcast_to(s.reshape(-1), (w,)) for (_, _, _, s), w in zip(group, widths)])
        weight = const(f"{tag}_weight", unsigned)
        w_scale = const(f"{tag}_weight_scale", w_scale.astype(np.float32))
        high = _node("MatMulIntegerToFloat", [hi, weight, one, w_scale, zero, zero], nodes, tag, domain="com.microsoft")
        low = _node("MatMulIntegerToFloat", [lo, weight, inverse, w_scale, zero, zero], nodes, tag,
                    domain="com.microsoft")
        y = _node("Mul", [_node("Add", [high, low], nodes, tag), scale], nodes, tag)
        parts = [y]
        if len(group) > 1:
            split = ir.Node("", "Split", [y, const(f"{tag}_widths", np.asarray(widths, np.int64))],
                            [ir.AttrInt64("axis", -1)], num_outputs=len(group), name=f"{_PREFIX}_{tag}_split")
            nodes.append(split)
            parts = list(split.outputs)
        graph.insert_before(first, nodes)
        for (node, *_), part in zip(group, parts):
            old = node.outputs[0]
            part.shape, part.type = old.shape, ir.TensorType(ir.DataType.FLOAT)  # MatMulIntegerToFloat's float32
            kept, old.name = old.name, None  # a graph output keeps its name
            ir.convenience.replace_all_uses_with(old, part, replace_graph_outputs=True)
            part.name = kept
            graph.remove(node, safe=True)
    return sum(len(g) for g in groups.values())
