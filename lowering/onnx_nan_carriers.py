"""NaN carriers a graph does not need: an ORT-form rewrite for the host, after ``onnx_decode_gemv``.

``MatMulNBits`` at accuracy level 4 drops a NaN of its input, so the ort form adds beside each
few-row GEMV (``lowering.onnx_decode_gemv``'s, and ``w8a8-blocks``' own) the row times a zero
column (a ``MatMul`` against zeros and an ``Add``): two nodes per GEMV, each a launch of
microseconds in a decode step.

A carrier is redundant where its GEMV reads a normalization (``RMSNormalization``,
``LayerNormalization``, ``SimplifiedLayerNormalization``; constant, finite scale and bias) of a
value that reaches a graph output along another path of nodes that propagate a non-finite value
(``PROPAGATES``). A normalization of finite values is finite (a sum of squares that overflows
divides the row by infinity: zeros), so a NaN in its output needs a NaN or an infinity in its
input, and that input then makes the other path's output non-finite anyway. A pre-norm
transformer reads its residual stream so: the carriers of the GEMVs after each layer's norms go
(q/k/v, gate/up), and the stream reaches the logits through the final norm and the ``lm_head``,
whose carrier stays (its residual is read by nothing else), as do those of ``o_proj`` (a NaN of
the past keys or values reaches its input first) and ``down_proj``. The paths counted never pass
through a carrier that may go, so one carrier's proof never rests on another that went.
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir

from qcompiler.lowering.onnx_sibling_matmuls import constant_array

_MS = "com.microsoft"
# (domain, op) -> the input slots through which a non-finite value reaches every output of the
# node (every input where None); the default domain is "" (``_op``). Not ``Split`` or ``Slice`` (an
# element reaches one part only), nor ops that may drop a NaN (``Max``, ``Relu``, ``MatMulNBits``
# at accuracy level 4, ...).
PROPAGATES = {
    **{("", op): None for op in ("Add", "Sub", "Mul", "Div", "Concat", "MatMul", "Gemm")},
    **{("", op): (0,) for op in ("Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand",
                                 "RMSNormalization", "LayerNormalization")},
    (_MS, "FusedMatMul"): None,
    (_MS, "SimplifiedLayerNormalization"): (0,),
    (_MS, "SkipSimplifiedLayerNormalization"): (0, 1),
    (_MS, "SkipLayerNormalization"): (0, 1),
}
NORMS = {("", "RMSNormalization"), ("", "LayerNormalization"), (_MS, "SimplifiedLayerNormalization")}


def _op(node: ir.Node):
    return ("" if node.domain == "ai.onnx" else node.domain, node.op_type)


def _zero_column(value: ir.Value) -> bool:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or len(tensor.shape) != 2 or tensor.shape[1] != 1:
        return False  # no weight's bytes read unless it is one column
    return not tensor.numpy().any()


def carriers(graph: ir.Graph) -> list:
    """(``MatMul`` carrier, the ``Add`` nodes that read it, the carried row) of every NaN carrier in
    ``graph``: the row times a zero column, added to values (one carrier may serve the parts of a
    merged GEMM)."""
    found = []
    for node in graph:
        if _op(node) != ("", "MatMul") or len(node.inputs) != 2 or not _zero_column(node.inputs[1]):
            continue
        adds = [use for use, _ in node.outputs[0].uses()]
        if adds and all(_op(add) == ("", "Add") for add in adds) and not node.outputs[0].is_graph_output():
            found.append((node, adds, node.inputs[0]))
    return found


def _finite_constant(value) -> bool:
    if value is None:
        return True  # an optional input left out
    array = constant_array(value)
    return array is not None and np.issubdtype(array.dtype, np.floating) and bool(np.isfinite(array).all())


def _normalized(value: ir.Value):
    """The input of the normalization that produced ``value`` (a finite constant scale and bias),
    else None."""
    norm = value.producer()
    if norm is None or _op(norm) not in NORMS or norm.outputs[0] is not value:
        return None
    if not all(_finite_constant(v) for v in norm.inputs[1:]):
        return None
    return norm.inputs[0]


def _reaches(start: ir.Value, cut: set) -> bool:
    """Whether a non-finite ``start`` reaches a graph output through ``PROPAGATES`` nodes, those in
    ``cut`` left out."""
    stack, seen = [start], {start}
    while stack:
        value = stack.pop()
        if value.is_graph_output():
            return True
        for node, slot in value.uses():
            slots = PROPAGATES.get(_op(node), ())
            if node in cut or not (slots is None or slot in slots):
                continue
            for out in node.outputs:
                if out not in seen:
                    seen.add(out)
                    stack.append(out)
    return False


def drop_redundant_carriers(model: ir.Model) -> int:
    """Remove from ``model``'s main graph each NaN carrier whose row is a normalization of a value
    that reaches an output without it or any other carrier removed; returns how many went.

    Decided from the last carrier to the first, each with those already removed and itself left
    out. Sound in the final graph: a later-removed carrier on an earlier proof's path reads a
    normalization of a value on that path, which its own proof carries on to an output."""
    graph = model.graph
    candidates = [(mm, adds, source) for mm, adds, row in carriers(graph)
                  if (source := _normalized(row)) is not None and not any(a.outputs[0].is_graph_output() for a in adds)]
    cut = set()
    for mm, _, source in reversed(candidates):
        if _reaches(source, cut | {mm}):
            cut.add(mm)
    for mm, adds, _ in candidates:
        if mm in cut:
            for add in adds:
                kept = next(v for v in add.inputs if v is not mm.outputs[0])
                ir.convenience.replace_all_uses_with(add.outputs[0], kept)
            graph.remove([*adds, mm], safe=True)
    return len(cut)
