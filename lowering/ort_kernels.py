"""Which ONNX Runtime kernel each GEMM of an ort-form file runs: the lines ``explain`` prints.

Read from the file's nodes, its weights' types and its scalar constants (not its weights' bytes),
so a session made from a cached file is described without loading the weights.
"""
from __future__ import annotations

import collections
from typing import Optional

import onnx
from onnx import numpy_helper

from qcompiler.ir.ops import TWO_PASS_FINE

_INT8 = 3  # onnx.TensorProto.INT8
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _attribute(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def describe(node, types: dict, columns: dict, scalars: Optional[dict] = None, shared: frozenset = frozenset()):
    """One GEMM node's kernel in words, or None for a node that is not a GEMM with constant weights
    (``types``: initializer name -> data type; ``columns``: initializer name -> its last dimension;
    ``scalars``: float scalar initializer name -> value; ``shared``: the values that are model
    parameters the session reads in place, or their transposes).
    A ``MatMul`` by one constant column is the NaN carrier beside a ``MatMulNBits``
    (``onnx_decode_gemv``), not a linear."""
    if node.op_type == "MatMulNBits":
        bits, level, block = (_attribute(node, "bits", 4), _attribute(node, "accuracy_level", 0),
                              _attribute(node, "block_size", 0))
        activations = f"int8 activations per block of {block}" if level == 4 else "float activations"
        return f"MatMulNBits, {bits}-bit weights, {activations}"
    if node.op_type == "MatMulIntegerToFloat" and len(node.input) > 1:
        kind = "u8 x s8 (exact with VNNI)" if types.get(node.input[1]) == _INT8 else "u8 x u8"
        a_scale = (scalars or {}).get(node.input[2])
        if a_scale is not None and abs(a_scale * TWO_PASS_FINE - 1) < 1e-6:
            return f"MatMulIntegerToFloat {kind}, int8 codes of the per-token rounding residual (second pass)"
        return f"MatMulIntegerToFloat {kind}, int8 activations per token or tensor"
    if node.op_type == "MatMul" and node.input[1] in types and columns.get(node.input[1]) != 1:
        return "MatMul, float weights and activations"
    if node.op_type == "MatMul" and node.input[1] in shared:
        return "MatMul, float weights read in place from the model's parameters"
    return None


def kernel_counts(model, parameters=()) -> collections.Counter:
    """How many GEMMs of ``model`` (an ``onnx.ModelProto``, weights loaded or not) run each kernel;
    ``parameters``: the names of its inputs that are model parameters."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    columns = {t.name: t.dims[-1] if t.dims else None for t in model.graph.initializer}
    scalars = {t.name: float(numpy_helper.to_array(t)) for t in model.graph.initializer
               if not t.dims and t.data_type == _FLOAT and t.data_location != onnx.TensorProto.EXTERNAL}
    shared = set(parameters)
    shared |= {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in shared}
    found = (describe(node, types, columns, scalars, frozenset(shared)) for node in model.graph.node)
    return collections.Counter(d for d in found if d is not None)
