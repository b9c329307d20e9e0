"""Rotary position embeddings as one ``RotaryEmbedding`` op (an ORT-form graph rewrite).

transformers applies RoPE as ``x * cos + rotate_half(x) * sin``, where ``rotate_half`` cuts the
head in two halves and concatenates the negated second with the first; the exporter writes that as
six nodes per query and key tensor (``Split``, ``Neg``, ``Concat``, two ``Mul``, ``Add``), 360 of a
SmolLM2 decode step's 1450. Opset 23's ``RotaryEmbedding`` computes the same products and sums in
one node (ONNX Runtime's CPU kernel; the same float operations, rounded alike up to fused
multiply-adds), taking the cos/sin tables per batch row and position, ``[B, S, D/2]``, when it is
given no position ids: the tables the model computed, so positions, batch rows of their own
(left padding) and any RoPE scaling stay the model's.

The tables are the model's ``cos``/``sin`` (``[B, S, D]`` after ``Unsqueeze(axis=1)``) cut to
their first half. That is exact only where both halves are equal, which the rewrite checks in the
graph: the table must be an elementwise function (``Cos``, ``Sin``, ``Cast``, a product with a
scalar constant) of ``Concat(f, f)`` along the last axis, which is how transformers builds it
(``emb = torch.cat((freqs, freqs), dim=-1)``). Anything else (interleaved RoPE, tables of another
origin) is left as it was.
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir

from qcompiler.lowering.onnx_graph import producer, replace_keeping_name
from qcompiler.lowering.onnx_sibling_matmuls import constant_array

_ELEMENTWISE = {"Cos", "Sin", "Cast", "Identity"}  # unary: equal halves stay equal
_SCALED = {"Mul", "Div"}  # with a scalar constant: likewise


def _last_axis(node: ir.Node, rank) -> bool:
    axis = node.attributes.get("axis")
    return axis is not None and rank is not None and axis.as_int() in (-1, rank - 1)


def _rank(value):
    return value.shape.rank() if value is not None and value.shape is not None else None


def _scalar(value) -> bool:
    array = constant_array(value)
    return array is not None and array.size == 1


def _equal_halves(table) -> bool:
    """True when ``table``'s last axis is ``Concat(f, f)`` under elementwise ops: its two halves
    are the same values."""
    value = table
    for _ in range(8):  # Cos/Sin, a scale, a cast: a short chain
        node = value.producer() if value is not None else None
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "Concat":
            return len(node.inputs) == 2 and node.inputs[0] is node.inputs[1] and _last_axis(node, _rank(value))
        if node.op_type in _ELEMENTWISE and len(node.inputs) == 1:
            value = node.inputs[0]
        elif node.op_type in _SCALED and len(node.inputs) == 2 and _scalar(node.inputs[1]):
            value = node.inputs[0]
        elif node.op_type == "Mul" and len(node.inputs) == 2 and _scalar(node.inputs[0]):
            value = node.inputs[1]
        else:
            return False
    return False


def _table(value):
    """The ``[B, S, D]`` table behind a ``[B, 1, S, D]`` cos/sin operand with equal halves, else None."""
    unsqueeze = producer(value, "Unsqueeze")
    if unsqueeze is None or len(unsqueeze.inputs) != 2:
        return None
    axes = constant_array(unsqueeze.inputs[1])
    table = unsqueeze.inputs[0]
    if axes is None or axes.reshape(-1).tolist() != [1] or _rank(table) != 3 or not _equal_halves(table):
        return None
    return table


def _slice_of(value, x, start: int, end: int) -> bool:
    """``value`` is ``x[..., start:end]`` (a ``Slice`` of the last axis; an end past it reads to the end)."""
    node = producer(value, "Slice")
    if node is None or node.inputs[0] is not x or len(node.inputs) < 4:
        return False
    starts, ends, axes = (constant_array(node.inputs[i]) for i in (1, 2, 3))
    steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or axes is None or starts.size != 1 or ends.size != 1 or axes.size != 1:
        return False
    if int(axes.reshape(-1)[0]) not in (-1, 3) or (steps is not None and steps.reshape(-1).tolist() != [1]):
        return False
    width = x.shape[3]
    stop = int(ends.reshape(-1)[0])
    return int(starts.reshape(-1)[0]) == start and (stop == end or (end == width and stop >= width))


def _split_halves(first, second, x, half: int) -> bool:
    """``first``, ``second`` are the two outputs of an even ``Split`` of ``x``'s last axis."""
    split = producer(first, "Split")
    if split is None or split is not second.producer() or split.inputs[0] is not x or len(split.outputs) != 2 \
            or not _last_axis(split, 4) or first is not split.outputs[0] or second is not split.outputs[1]:
        return False
    if len(split.inputs) > 1 and split.inputs[1] is not None:
        sizes = constant_array(split.inputs[1])
        return sizes is not None and sizes.reshape(-1).tolist() == [half, half]
    return True  # num_outputs=2 of an even last dimension: two equal halves


def _halves(rotated, x, half: int) -> bool:
    """``rotated`` is ``Concat(-x[..., half:], x[..., :half])`` along the last axis (the halves cut
    by two ``Slice`` nodes or one ``Split``)."""
    concat = producer(rotated, "Concat")
    if concat is None or len(concat.inputs) != 2 or not _last_axis(concat, 4):
        return False
    neg = producer(concat.inputs[0], "Neg")
    if neg is None:
        return False
    second, first = neg.inputs[0], concat.inputs[1]
    if _slice_of(first, x, 0, half) and _slice_of(second, x, half, 2 * half):
        return True
    return _split_halves(first, second, x, half)


def _products(node: ir.Node):
    """The two operands of a ``Mul`` node (either order)."""
    return (node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])


def _match(add: ir.Node):
    """(x, cos table, sin table) when ``add`` is ``x * cos + rotate_half(x) * sin``, else None."""
    if add.domain not in ("", "ai.onnx") or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for plain, turned in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        left, right = producer(plain, "Mul"), producer(turned, "Mul")
        if left is None or right is None:
            continue
        for x, cos in _products(left):
            shape = x.shape if x is not None else None
            if shape is None or shape.rank() != 4 or not isinstance(shape[3], int) or shape[3] % 2:
                continue
            for rotated, sin in _products(right):
                if not _halves(rotated, x, shape[3] // 2):
                    continue
                cos_table, sin_table = _table(cos), _table(sin)
                if cos_table is None or sin_table is None:
                    continue
                # the tables' rows are x's batch rows and positions (no broadcast: the op takes none)
                if list(cos_table.shape[:2]) != [shape[0], shape[2]] or list(sin_table.shape[:2]) != [shape[0], shape[2]]:
                    continue
                return x, cos_table, sin_table
    return None


def fuse_rotary(model: ir.Model) -> int:
    """Rewrite every full-head, non-interleaved RoPE of ``model``'s main graph into
    ``RotaryEmbedding``; returns how many (the nodes they leave unused are for the caller's
    unused-node pass)."""
    graph = model.graph
    found = [(node, m) for node in graph if (m := _match(node)) is not None]
    if not found:
        return 0
    halves, count = {}, 0  # one half table per cos/sin table, shared by every layer
    axes = ir.Value(name="_qc_rope_axes", const_value=ir.tensor(np.asarray([-1], np.int64)))
    start = ir.Value(name="_qc_rope_start", const_value=ir.tensor(np.asarray([0], np.int64)))
    for value in (axes, start):
        graph.register_initializer(value)

    def half(table, before):
        if id(table) not in halves:
            size = table.shape[2]
            end = ir.Value(name=f"_qc_rope_end_{len(halves)}", const_value=ir.tensor(np.asarray([size // 2], np.int64)))
            graph.register_initializer(end)
            cut = ir.Node("", "Slice", [table, start, end, axes], name=f"_qc_rope_half_{len(halves)}")
            cut.outputs[0].shape = ir.Shape([table.shape[0], table.shape[1], size // 2])
            cut.outputs[0].type = table.type
            graph.insert_before(before, [cut])  # before the first use, the graph's nodes being in order
            halves[id(table)] = cut.outputs[0]
        return halves[id(table)]

    for add, (x, cos_table, sin_table) in found:
        if not isinstance(cos_table.shape[2], int) or not isinstance(sin_table.shape[2], int) \
                or cos_table.shape[2] != x.shape[3] or sin_table.shape[2] != x.shape[3]:
            continue
        rope = ir.Node("", "RotaryEmbedding", [x, half(cos_table, add), half(sin_table, add)],
                       [ir.AttrInt64("interleaved", 0)], name=f"_qc_rope_{count}")
        graph.insert_before(add, [rope])
        replace_keeping_name(add.outputs[0], rope.outputs[0])
        count += 1
    return count
