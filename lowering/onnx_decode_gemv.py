"""Few-row INT8 GEMMs as ``MatMulNBits`` (8-bit, accuracy level 4): an ORT-form rewrite for the host.

A w8a8 linear of the ``ort`` form is a per-token quantization (``Abs``, ``ReduceMax``, ``Max``,
the NaN carrier's ``ReduceSum``, ``Mul``, ``Add``, ``Div``, ``Shape``, ``Expand``, a blocked
``QuantizeLinear``), a ``MatMulIntegerToFloat`` and a ``Mul`` by the token scales: eleven nodes.
When a graph's activation has a small static row count (a decode step: one token), each of them
is a launch of microseconds around a GEMV that reads the weights once, and the launches cost more
than the arithmetic. ONNX Runtime's ``MatMulNBits`` with ``bits=8`` and ``accuracy_level=4``
takes the float activation, quantizes it to int8 itself (symmetric, one scale per block of
``block_size`` input channels) and runs an int8 dot-product kernel: one node, and on this CPU 1.5-3x
faster than the eleven (docs/results/cpu_decode_kernels.md).

Its activation scales are per block of a row instead of per row: every block's scale is at most
the row's, so each activation is rounded at least as finely as the q-op reference rounds it
(the weights' codes and per-channel scales are the same; tested against float64 next to the
reference in tests/unit/test_onnx_host_kernels.py). ``MatMulNBits`` drops a NaN in its input;
the rewrite adds the row times a zero column to the output, as the quantization it replaces
carried it with the row's sum times zero.

A 4-bit ``MatMulNBits`` (w4a16) over as few rows runs at accuracy level 4 too: int8 activations
per block of its group, about twice as fast at one row; it adds the rounding of int8 activations
(under 1% of an output's norm: tests/unit/test_onnx_host_kernels.py) to the recipe's float-activation result, and ``explain`` says so.

A weight-only INT8 linear (w8a16, and a language model's ``lm_head`` reading an INT8 embedding
table) is written as a float ``MatMul`` of its dequantized weight, which ONNX Runtime folds into a
float32 copy when the session loads: over one row that GEMV streams four bytes per weight. Over as
few rows it becomes the same 8-bit ``MatMulNBits`` on the stored codes (one scale per output
channel, repeated per block), at accuracy level 4 like the 4-bit one: int8 activations per block,
an error of the same size as the 4-bit kernel's added to the recipe's float-activation result, and
``explain`` says so.

Only graphs whose row count is static and at most ``MAX_ROWS`` are rewritten: at four rows the
integer GEMM of ``MatMulIntegerToFloat`` (u8 x s8 on a VNNI CPU) was already faster, at hundreds
twice as fast (prefill, encoders).
"""
from __future__ import annotations

import math

import numpy as np
from onnxscript import ir

from qcompiler.lowering.onnx_sibling_matmuls import constant_array

_MMITF = ("com.microsoft", "MatMulIntegerToFloat")
MAX_ROWS = 1  # a decode step of one sequence: faster at one row; at four rows the kernel alone was
# 8-28% slower than the u8 x s8 integer GEMM (docs/results/cpu_decode_kernels.md)
BLOCKS = (64, 32, 16)  # activation block sizes, the first that divides the input features
_U8_ZERO = 128



def rows_of(value: ir.Value):
    """The static row count of an activation (all dimensions but the last), or None."""
    shape = value.shape
    if shape is None or shape.rank() < 2 or not all(isinstance(d, int) for d in shape):
        return None
    return math.prod(shape[:-1])


def _is(value, expected) -> bool:
    array = constant_array(value)
    return array is not None and array.size == 1 and array.reshape(-1)[0] == expected


def _quantized_input(node: ir.Node):
    """(float activation, token scales) of a GEMM whose activation is the ort form's per-token
    quantization (a ``QuantizeLinear`` blocked by whole rows, unsigned with zero point 128), else None."""
    q = node.inputs[0].producer() if node.inputs[0] is not None else None
    if q is None or q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx") or len(q.inputs) != 3:
        return None
    x, scale = q.inputs[0], q.inputs[1]
    block = q.attributes.get("block_size")
    if x is None or x.shape is None or not isinstance(x.shape[-1], int) or block is None or block.as_int() != x.shape[-1]:
        return None
    axis = q.attributes.get("axis")
    if axis is None or axis.as_int() not in (-1, x.shape.rank() - 1):
        return None
    return x, scale


def _scaled_uses(value: ir.Value, scale: ir.Value):
    """[(value to replace, split output index or None)] when every use of ``value`` multiplies it by
    ``scale``, directly or after one ``Split``; with the Split node (or None); else None."""
    uses = list(value.uses())
    if len(uses) == 1 and uses[0][0].op_type == "Split":
        split = uses[0][0]
        axis = split.attributes.get("axis")
        if axis is None or axis.as_int() not in (-1, (value.shape.rank() - 1) if value.shape else -1):
            return None
        targets = []
        for index, part in enumerate(split.outputs):
            found = _scaled_uses(part, scale)
            if found is None or found[1] is not None or len(found[0]) != 1:
                return None
            targets.append((found[0][0][0], index))
        return targets, split
    targets = []
    for consumer, _ in uses:
        if consumer.op_type != "Mul" or consumer.domain not in ("", "ai.onnx") or scale not in consumer.inputs \
                or value not in consumer.inputs:
            return None
        targets.append((consumer.outputs[0], None))
    return (targets, None) if targets else None


def _candidate(node: ir.Node, outputs: set):
    """What the rewrite needs of a ``MatMulIntegerToFloat`` it can replace, or None."""
    if (node.domain, node.op_type) != _MMITF or len(node.inputs) != 6 or node.outputs[0] in outputs:
        return None
    found = _quantized_input(node)
    if found is None:
        return None
    x, scale = found
    rows = rows_of(x)
    weight, w_scale = constant_array(node.inputs[1]), constant_array(node.inputs[3])
    if rows is None or rows > MAX_ROWS or weight is None or weight.dtype != np.uint8 or weight.ndim != 2 or w_scale is None:
        return None
    if not (_is(node.inputs[2], 1.0) and _is(node.inputs[4], _U8_ZERO) and _is(node.inputs[5], _U8_ZERO)):
        return None
    if w_scale.size not in (1, weight.shape[1]) or x.shape[-1] != weight.shape[0]:
        return None
    block = next((b for b in BLOCKS if weight.shape[0] % b == 0), None)
    uses = _scaled_uses(node.outputs[0], scale)
    if block is None or uses is None:
        return None
    targets, split = uses
    if split is None and len(targets) > 1 and any(old in outputs for old, _ in targets):
        return None  # one value cannot stand for two graph outputs
    return x, weight, w_scale, block, uses


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def _nan_carried(graph: ir.Graph, x: ir.Value, y: ir.Value, name: str) -> list:
    """Nodes computing ``y`` plus ``x``'s row times a zero column: ``MatMulNBits`` at accuracy
    level 4 drops a NaN of its input, and this carries it (and an infinity, as NaN) to the row's
    outputs. One float ``MatMul`` against zeros is the row's sum times zero in one node."""
    column = f"_qc_nan_zero_column_{x.shape[-1]}"  # one per input width, shared by the GEMVs
    zeros = graph.initializers.get(column) or _const(graph, column, np.zeros((x.shape[-1], 1), np.float32))
    carrier = ir.Node("", "MatMul", [x, zeros], name=f"{name}_nan_carrier")
    return [carrier, ir.Node("", "Add", [y, carrier.outputs[0]], name=f"{name}_nan_add")]


def _rewrite(graph: ir.Graph, node: ir.Node, index: int, x, weight, w_scale, block: int, uses) -> None:
    k, n = weight.shape
    blocks = k // block
    codes = np.ascontiguousarray(weight.T).reshape(n, blocks, block)  # [N, K/block, block], zero point 128
    scales = np.repeat(np.broadcast_to(w_scale.reshape(-1), (n,)).astype(np.float32), blocks)
    name = f"_qc_gemv_{index}"
    gemv = ir.Node("com.microsoft", "MatMulNBits",
                   [x, _const(graph, f"{name}_codes", codes), _const(graph, f"{name}_scales", scales)],
                   [ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 8),
                    ir.AttrInt64("block_size", block), ir.AttrInt64("accuracy_level", 4)], name=name)
    new = [gemv, *_nan_carried(graph, x, gemv.outputs[0], name)]
    out = new[-1].outputs[0]
    out.shape = ir.Shape(list(x.shape[:-1]) + [n])
    out.type = ir.TensorType(ir.DataType.FLOAT)
    targets, split = uses
    parts = [out]
    if split is not None:
        cut = ir.Node("", "Split", [out, *split.inputs[1:]], split.attributes.values(),
                      num_outputs=len(split.outputs), name=f"{name}_split")
        new.append(cut)
        parts = list(cut.outputs)
        for part, old in zip(parts, split.outputs):
            part.shape, part.type = old.shape, old.type
    graph.insert_before(node, new)
    for old, part in targets:
        new_value = parts[part if part is not None else 0]
        kept, old.name = old.name, None  # a graph output keeps its name (a session's outputs are named)
        ir.convenience.replace_all_uses_with(old, new_value, replace_graph_outputs=True)
        new_value.name = kept


def _float_nbits(node: ir.Node, outputs: set) -> bool:
    """A 4-bit ``MatMulNBits`` with float activations (accuracy level 0) over a few static rows."""
    if (node.domain, node.op_type) != ("com.microsoft", "MatMulNBits"):
        return False
    bits, level = node.attributes.get("bits"), node.attributes.get("accuracy_level")
    rows = rows_of(node.inputs[0]) if node.inputs[0] is not None else None
    return (bits is None or bits.as_int() == 4) and (level is None or level.as_int() == 0) and \
        rows is not None and rows <= MAX_ROWS and node.inputs[0].dtype == ir.DataType.FLOAT


def _int8_activations(graph: ir.Graph, node: ir.Node, index: int) -> None:
    node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", 4)
    y = node.outputs[0]
    uses = list(y.uses())
    carried = _nan_carried(graph, node.inputs[0], y, f"_qc_gemv4_{index}")
    out = carried[-1].outputs[0]
    out.shape, out.type = y.shape, y.type
    graph.insert_after(node, carried)
    for consumer, slot in uses:
        consumer.replace_input_with(slot, out)
    if y.is_graph_output():  # a language model's lm_head: the carried value takes the output's place and name
        name, y.name = y.name, f"_qc_gemv4_{index}_uncarried"
        graph.outputs[:] = [out if value is y else value for value in graph.outputs]
        out.name = name


def dequantized_weight(value: ir.Value):
    """(int8 codes [K, N], per-channel scales) when ``value`` is the ort form's dequantized INT8
    weight ``Mul(Cast(Transpose(codes), FLOAT), scales)`` (``ort_linear_w8a16``; the optimizer may
    have folded the ``Transpose`` into the constant) of constants, else None."""
    mul = value.producer() if value is not None else None
    if mul is None or (mul.domain, mul.op_type) not in (("", "Mul"), ("ai.onnx", "Mul")):
        return None
    cast = mul.inputs[0].producer() if mul.inputs[0] is not None else None
    if cast is None or cast.op_type != "Cast" or cast.attributes.get("to") is None \
            or cast.attributes["to"].as_int() != ir.DataType.FLOAT.value:
        return None
    stored = cast.inputs[0]
    transpose = stored.producer() if stored is not None else None
    if transpose is not None:
        perm = transpose.attributes.get("perm") if transpose.op_type == "Transpose" else None
        if perm is None or list(perm.as_ints()) != [1, 0]:
            return None
        codes = constant_array(transpose.inputs[0])
        codes = codes.T if codes is not None else None
    else:
        codes = constant_array(stored)
    scales = constant_array(mul.inputs[1])
    if codes is None or codes.dtype != np.int8 or codes.ndim != 2 or scales is None \
            or scales.size not in (1, codes.shape[1]) or scales.dtype != np.float32:
        return None
    return codes, scales


def _weight_only_int8(node: ir.Node):
    """What the rewrite needs of a few-row float ``MatMul`` of a dequantized INT8 weight, or None."""
    if (node.domain, node.op_type) not in (("", "MatMul"), ("ai.onnx", "MatMul")) or len(node.inputs) != 2:
        return None
    x = node.inputs[0]
    rows = rows_of(x) if x is not None else None
    found = dequantized_weight(node.inputs[1])
    if rows is None or rows > MAX_ROWS or found is None or x.dtype != ir.DataType.FLOAT:
        return None
    codes, scales = found
    block = next((b for b in BLOCKS if codes.shape[0] % b == 0), None)
    if block is None or x.shape[-1] != codes.shape[0]:
        return None
    unsigned = (codes.astype(np.int16) + _U8_ZERO).astype(np.uint8)  # [K, N] as the integer GEMMs store it
    return x, unsigned, scales, block, ([(node.outputs[0], None)], None)


def few_row_gemvs(model: ir.Model) -> int:
    """Rewrite every few-row w8a8 GEMM of ``model``'s main graph (and its quantization) and every
    few-row weight-only INT8 GEMM into ``MatMulNBits``, and run few-row 4-bit ``MatMulNBits`` on
    int8 activations; returns how many were rewritten (the nodes they leave unused are for the
    caller's unused-node pass)."""
    graph = model.graph
    outputs = set(graph.outputs)
    found = [(node, c) for node in graph if (c := _candidate(node, outputs)) is not None]
    for index, (node, candidate) in enumerate(found):
        _rewrite(graph, node, index, *candidate)
    weight_only = [(node, c) for node in graph if (c := _weight_only_int8(node)) is not None]
    for index, (node, candidate) in enumerate(weight_only, start=len(found)):
        _rewrite(graph, node, index, *candidate)
    four_bit = [node for node in graph if _float_nbits(node, outputs)]
    for index, node in enumerate(four_bit):
        _int8_activations(graph, node, index)
    return len(found) + len(weight_only) + len(four_bit)
