"""A residual ``Add`` and the RMS normalization that reads it as one ``SkipSimplifiedLayerNormalization``:
an ORT-form rewrite for the host, over a few static rows (a decode step).

A pre-norm decoder layer adds each block's output to the residual stream and normalizes the sum:
``h = a + b; y = RMSNormalization(h, gamma)``, the sum read again by the next residual ``Add``.
ONNX Runtime's contrib op ``SkipSimplifiedLayerNormalization(a, b, gamma)`` returns both ``y`` and
the sum (its fourth output) from one pass, one node instead of two. Its own fusion does not take
opset 23's ``RMSNormalization``, so this rewrite states it. The sum is the same bit for bit, the
normalization within float32 rounding (its sum of squares may add in another order), and a NaN or
an infinity leaves the same outputs non-finite (tests/unit/test_onnx_skip_norm.py).

Only rows at most ``onnx_decode_gemv.MAX_ROWS`` (a decode step's one token) are rewritten: that is
where it was measured (SmolLM2's decode step loses 60 of its nodes; docs/experiments.md, "Decode on
the CPU"), and the layer-norm form of the same fusion was 2.8-3.8x slower than the two nodes from
32 rows up (``runtimes.ort_slow_fusions``).
"""
from __future__ import annotations

import math

import numpy as np
from onnxscript import ir

from qcompiler.lowering.onnx_decode_gemv import MAX_ROWS
from qcompiler.lowering.onnx_graph import producer, replace_keeping_name
from qcompiler.lowering.onnx_sibling_matmuls import constant_array


def _static(value: ir.Value):
    shape = value.shape if value is not None else None
    if shape is None or shape.rank() not in (2, 3) or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _candidate(node: ir.Node):
    """(the ``Add``, its two addends, gamma, epsilon) when ``node`` is an RMS normalization over the
    last axis of a few-row sum of two values of one shape, with a constant 1-D float scale."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "RMSNormalization" or len(node.inputs) != 2:
        return None
    axis, stash = node.attributes.get("axis"), node.attributes.get("stash_type")
    if (axis is not None and axis.as_int() != -1) or (stash is not None and stash.as_int() != 1):
        return None
    add = producer(node.inputs[0], "Add")
    if add is None or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    shape = _static(a)
    if shape is None or _static(b) != shape or _static(add.outputs[0]) != shape or math.prod(shape[:-1]) > MAX_ROWS:
        return None
    if a.dtype != ir.DataType.FLOAT or b.dtype != ir.DataType.FLOAT:
        return None
    gamma = constant_array(node.inputs[1])
    if gamma is None or gamma.dtype != np.float32 or gamma.ndim != 1 or gamma.shape[0] != shape[-1]:
        return None
    epsilon = node.attributes.get("epsilon")
    return add, a, b, node.inputs[1], (epsilon.as_float() if epsilon is not None else 1e-5)


def fuse_skip_norms(model: ir.Model) -> int:
    """Rewrite every few-row residual ``Add`` + ``RMSNormalization`` of ``model``'s main graph;
    returns how many."""
    graph = model.graph
    norms = [node for node in graph if node.op_type == "RMSNormalization"]
    count = 0
    for norm in norms:  # each read when its turn comes: an earlier rewrite may have replaced its addends
        found = _candidate(norm)
        if found is None:
            continue
        add, a, b, gamma, epsilon = found
        index, count = count, count + 1
        fused = ir.Node("com.microsoft", "SkipSimplifiedLayerNormalization", [a, b, gamma],
                        [ir.AttrFloat32("epsilon", epsilon)], num_outputs=4, name=f"_qc_skip_norm_{index}")
        graph.insert_before(add, fused)
        replace_keeping_name(norm.outputs[0], fused.outputs[0])
        replace_keeping_name(add.outputs[0], fused.outputs[3])
        graph.remove([norm, add], safe=True)
    if count and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    return count
