"""One integer GEMM where several read the same quantized activation (an ORT-form graph rewrite).

The linears that read one input (attention's q/k/v projections, an MLP's gate and up projections)
each become a ``MatMulIntegerToFloat`` of the same quantized activation, scale and zero points with
constant weights. Their weights side by side (``[K, N1 + N2 + ...]``, the per-column weight scales
likewise) make one GEMM whose output a ``Split`` cuts back into the linears' outputs: the same
integer products and the same epilogue per column, so the same values, with one kernel launch and
one pass over the activation where there were two or three. At decode, where each GEMM is a short
read of its weights, the launches are what the merge saves (SmolLM2-135M w8a8, one token on a
200-token cache: docs/results/ort_decode_session.md).
"""
from __future__ import annotations

import collections

import numpy as np
from onnxscript import ir

_OP = ("com.microsoft", "MatMulIntegerToFloat")
_A, _B, _A_SCALE, _B_SCALE, _A_ZP, _B_ZP = range(6)


def _constant(value) -> "np.ndarray | None":
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _candidate(node: ir.Node, outputs: set) -> bool:
    """A merge candidate: no bias, a 2-D constant weight, a constant scalar or per-column weight
    scale, a scalar weight zero point, and an output that is not the graph's."""
    if (node.domain, node.op_type) != _OP or len(node.inputs) != 6 or node.outputs[0] in outputs:
        return False
    weight, scale, zero = (_constant(node.inputs[i]) for i in (_B, _B_SCALE, _B_ZP))
    if weight is None or weight.ndim != 2 or scale is None or zero is None or zero.size != 1:
        return False
    return scale.size in (1, weight.shape[1])


def _key(node: ir.Node) -> tuple:
    """Nodes that may share one GEMM: the same activation, activation scale and zero point (the
    same values), equal weight zero points, weights of one type and depth."""
    zero, weight = _constant(node.inputs[_B_ZP]), _constant(node.inputs[_B])
    return (id(node.inputs[_A]), id(node.inputs[_A_SCALE]), id(node.inputs[_A_ZP]), zero.dtype.str,
            zero.reshape(-1).tolist()[0], weight.dtype.str, weight.shape[0])


def _merged(graph: ir.Graph, group: list, index: int) -> None:
    weights = [_constant(n.inputs[_B]) for n in group]
    widths = [w.shape[1] for w in weights]
    scales = [np.broadcast_to(_constant(n.inputs[_B_SCALE]).reshape(-1), (w,)) for n, w in zip(group, widths)]
    constants = {}
    for name, array in (("weight", np.concatenate(weights, axis=1)), ("scale", np.concatenate(scales)),
                        ("split", np.asarray(widths, np.int64))):
        constants[name] = ir.Value(name=f"_qc_siblings_{index}_{name}", const_value=ir.tensor(array))
        graph.register_initializer(constants[name])
    first = group[0]
    gemm = ir.Node(*_OP, [first.inputs[_A], constants["weight"], first.inputs[_A_SCALE], constants["scale"],
                          first.inputs[_A_ZP], first.inputs[_B_ZP]], name=f"_qc_siblings_{index}")
    split = ir.Node("", "Split", [gemm.outputs[0], constants["split"]], [ir.AttrInt64("axis", -1)],
                    num_outputs=len(group), name=f"_qc_siblings_{index}_split")
    graph.insert_before(first, [gemm, split])
    for node, part in zip(group, split.outputs):
        part.shape, part.type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_all_uses_with(node.outputs[0], part)
    graph.remove(group, safe=True)


def merge_sibling_matmuls(model: ir.Model) -> int:
    """Merge the ``MatMulIntegerToFloat`` nodes of ``model``'s main graph that read the same
    quantized activation; returns how many nodes were merged away."""
    graph = model.graph
    outputs = set(graph.outputs)
    groups = collections.defaultdict(list)
    for node in graph:
        if _candidate(node, outputs):
            groups[_key(node)].append(node)
    merged = 0
    for index, group in enumerate(g for g in groups.values() if len(g) > 1):
        _merged(graph, group, index)
        merged += len(group) - 1
    return merged
