"""One GEMM where several read the same activation with constant weights (an ORT-form graph rewrite).

The linears that read one input (attention's q/k/v projections, an MLP's gate and up projections)
each become a GEMM of the same activation with constant weights: a ``MatMulIntegerToFloat`` of one
quantized activation (w8a8), a ``MatMulNBits`` (w4a16). Their weights side by side (the output
channels of one after the other's, the per-channel scales and zero points likewise) make one GEMM
whose output a ``Split`` cuts back into the linears' outputs: the same products and the same
epilogue per output channel, so the same values, with one kernel launch and one pass over the
activation where there were two or three. At decode, where each GEMM is a short read of its
weights, the launches are what the merge saves (SmolLM2-135M w8a8, one token on a 200-token
cache: docs/results/ort_decode_session.md).

``SIBLINGS`` holds one row per GEMM op: which nodes can merge, which of them may share one GEMM,
and how the merged node's inputs and attributes are made.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable

import numpy as np
from onnxscript import ir


def constant_array(value) -> "np.ndarray | None":
    """The array of a constant ``ir.Value`` (an initializer or folded constant), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


# ----------------------------------------------------------------------------- MatMulIntegerToFloat
_A, _B, _A_SCALE, _B_SCALE, _A_ZP, _B_ZP = range(6)


def _int8_candidate(node: ir.Node) -> bool:
    """No bias, a 2-D constant weight, a constant scalar or per-column weight scale, a scalar
    weight zero point."""
    if len(node.inputs) != 6:
        return False
    weight, scale, zero = (constant_array(node.inputs[i]) for i in (_B, _B_SCALE, _B_ZP))
    if weight is None or weight.ndim != 2 or scale is None or zero is None or zero.size != 1:
        return False
    return scale.size in (1, weight.shape[1])


def _int8_key(node: ir.Node) -> tuple:
    """The same activation, activation scale and zero point (the same values), equal weight zero
    points, weights of one type and depth."""
    zero, weight = constant_array(node.inputs[_B_ZP]), constant_array(node.inputs[_B])
    return (id(node.inputs[_A]), id(node.inputs[_A_SCALE]), id(node.inputs[_A_ZP]), zero.dtype.str,
            zero.reshape(-1).tolist()[0], weight.dtype.str, weight.shape[0])


def _int8_merged(group: list, const: Callable) -> tuple:
    """(inputs, attributes, output widths) of the merged ``MatMulIntegerToFloat``."""
    weights = [constant_array(n.inputs[_B]) for n in group]
    widths = [w.shape[1] for w in weights]
    scales = [np.broadcast_to(constant_array(n.inputs[_B_SCALE]).reshape(-1), (w,)) for n, w in zip(group, widths)]
    first = group[0]
    inputs = [first.inputs[_A], const("weight", np.concatenate(weights, axis=1)), first.inputs[_A_SCALE],
              const("scale", np.concatenate(scales)), first.inputs[_A_ZP], first.inputs[_B_ZP]]
    return inputs, {}, widths


# ----------------------------------------------------------------------------- MatMulNBits
_NBITS_SAME = ("K", "bits", "block_size", "accuracy_level")  # attributes the merged GEMMs share


def _attribute(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def _nbits_candidate(node: ir.Node) -> bool:
    """Activation, constant codes and scales, optional constant zero points; no group index, no bias."""
    if len(node.inputs) < 3 or len(node.inputs) > 4 or any(k not in _NBITS_SAME + ("N",) for k in node.attributes):
        return False
    codes, scales = constant_array(node.inputs[1]), constant_array(node.inputs[2])
    zeros = constant_array(node.inputs[3]) if len(node.inputs) == 4 and node.inputs[3] is not None else None
    if codes is None or codes.ndim != 3 or scales is None or scales.size % codes.shape[0]:
        return False
    return len(node.inputs) == 3 or node.inputs[3] is None or zeros is not None


def _nbits_key(node: ir.Node) -> tuple:
    codes = constant_array(node.inputs[1])
    zeros = constant_array(node.inputs[3]) if len(node.inputs) == 4 and node.inputs[3] is not None else None
    return (id(node.inputs[0]), tuple(_attribute(node, a) for a in _NBITS_SAME), codes.dtype.str, codes.shape[1:],
            constant_array(node.inputs[2]).dtype.str, None if zeros is None else zeros.dtype.str)


def _nbits_merged(group: list, const: Callable) -> tuple:
    codes = [constant_array(n.inputs[1]) for n in group]
    widths = [c.shape[0] for c in codes]
    inputs = [group[0].inputs[0], const("codes", np.concatenate(codes, axis=0)),
              const("scales", np.concatenate([constant_array(n.inputs[2]).reshape(-1) for n in group]))]
    if len(group[0].inputs) == 4 and group[0].inputs[3] is not None:  # per output row: rows concatenate
        inputs.append(const("zeros", np.concatenate([constant_array(n.inputs[3]).reshape(-1) for n in group])))
    attributes = {a: _attribute(group[0], a) for a in _NBITS_SAME if a in group[0].attributes}
    return inputs, {**attributes, "N": sum(widths)}, widths


@dataclass(frozen=True)
class Sibling:
    """A GEMM op that merges: ``candidate(node)``, ``key(node)`` (equal keys share one GEMM) and
    ``merged(group, const) -> (inputs, int attributes, output widths)``, where ``const(name,
    array)`` makes an initializer."""

    candidate: Callable
    key: Callable
    merged: Callable


SIBLINGS = {
    ("com.microsoft", "MatMulIntegerToFloat"): Sibling(_int8_candidate, _int8_key, _int8_merged),
    ("com.microsoft", "MatMulNBits"): Sibling(_nbits_candidate, _nbits_key, _nbits_merged),
}


def _merge(graph: ir.Graph, op: tuple, group: list, index: int) -> None:
    def const(name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=f"_qc_siblings_{index}_{name}", const_value=ir.tensor(array))
        graph.register_initializer(value)
        return value

    inputs, attributes, widths = SIBLINGS[op].merged(group, const)
    gemm = ir.Node(*op, inputs, [ir.AttrInt64(k, v) for k, v in attributes.items()], name=f"_qc_siblings_{index}")
    split = ir.Node("", "Split", [gemm.outputs[0], const("split", np.asarray(widths, np.int64))],
                    [ir.AttrInt64("axis", -1)], num_outputs=len(group), name=f"_qc_siblings_{index}_split")
    graph.insert_before(group[0], [gemm, split])
    for node, part in zip(group, split.outputs):
        part.shape, part.type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_all_uses_with(node.outputs[0], part)
    graph.remove(group, safe=True)


def merge_sibling_matmuls(model: ir.Model) -> int:
    """Merge the GEMMs of ``model``'s main graph that read the same activation (``SIBLINGS``);
    returns how many nodes were merged away."""
    graph = model.graph
    outputs = set(graph.outputs)
    groups = collections.defaultdict(list)
    for node in graph:
        op = (node.domain, node.op_type)
        if op in SIBLINGS and node.outputs[0] not in outputs and SIBLINGS[op].candidate(node):
            groups[(op, SIBLINGS[op].key(node))].append(node)
    merged = 0
    for index, ((op, _), group) in enumerate((k, g) for k, g in groups.items() if len(g) > 1):
        _merge(graph, op, group, index)
        merged += len(group) - 1
    return merged
