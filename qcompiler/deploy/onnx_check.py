"""The TensorRT explicit-quantization conformance checker for exported ONNX graphs.

``check(model)`` walks a graph and returns one ``Violation`` per broken rule; an empty list
means TensorRT's explicit-quantization rules (as its developer guide states them) hold:

* Q/DQ zero points are constant and 0, of a signed type (INT8, FP8 E4M3, INT4);
* scales are constant, finite and positive; activation scales are per tensor;
* weight DequantizeLinear is per channel on the output-channel axis of the weight as its
  consumer reads it (MatMul ``[K, N]``: axis 1; Gemm with ``transB=1`` and Conv: axis 0; the
  axis followed through Transposes, not verifiable through a Reshape), or blocked along K for
  INT4 (opset 21); weights are of a signed type, with or without an explicit zero point;
* every QuantizeLinear feeds DequantizeLinears only, and every activation DequantizeLinear
  reads a QuantizeLinear (TensorRT fuses Q/DQ pairs; a lone Q or DQ is not a placement it takes);
* no integer-arithmetic or ONNX Runtime contrib op (MatMulInteger, MatMulNBits, ...);
* the default-domain opset is high enough for the types used (per-axis: 13, FP8: 19, INT4: 21).

Constants come from initializers and from ``Constant`` nodes in any attribute form; ``If`` /
``Loop`` / ``Scan`` bodies (which see their outer scopes' constants) and model-local functions are
checked too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np

from qcompiler.errors import InvalidFile
from qcompiler.runtimes.ort_session import require_onnx

SIGNED = {"INT8", "FLOAT8E4M3FN", "INT4"}
MIN_OPSET = {"INT8": 13, "FLOAT8E4M3FN": 19, "INT4": 21, "UINT4": 21}
NOT_EXPLICIT_QUANTIZATION = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "MatMulNBits",
                             "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
# where each consumer reads its weight's output channels
_WEIGHT_AXIS = {"MatMul": 1, "Conv": 0, "ConvTranspose": 1}


@dataclass(frozen=True)
class Violation:
    rule: str        # short rule id
    node: str        # the offending node's name (or "model")
    message: str     # what is wrong and how to fix it

    def __str__(self):
        return f"[{self.rule}] {self.node}: {self.message}"


def _load(model):
    """A ModelProto from a path (``InvalidFile`` naming the problem if it cannot be one) or as given."""
    if not isinstance(model, (str, os.PathLike)):
        return model
    onnx = require_onnx()
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise InvalidFile(f"{path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise InvalidFile(f"{path} is not an ONNX model (it does not parse as one: {type(e).__name__}); "
                          f"give the .onnx file qcompile export or torch.onnx.export wrote") from None
    if not proto.graph.node:
        raise InvalidFile(f"{path} is not an ONNX model (it parses, but holds no graph); give the .onnx file "
                          f"qcompile export or torch.onnx.export wrote")
    return proto


def _constant_tensor(node):
    """The TensorProto a ``Constant`` node produces, in any of its attribute forms."""
    import onnx
    from onnx import numpy_helper

    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if a.name in ("value", "sparse_value") and isinstance(value, onnx.TensorProto):
            return value
        dtype = {"value_float": np.float32, "value_floats": np.float32,
                 "value_int": np.int64, "value_ints": np.int64}.get(a.name)
        if dtype is not None:
            return numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])
    return None  # value_string(s): not a number, never a scale or zero point


def check(model: Union[str, "onnx.ModelProto"]) -> list:
    """Every TensorRT explicit-quantization violation in ``model`` (a path or ModelProto), in its
    main graph, in every subgraph (``If`` / ``Loop`` / ``Scan`` bodies) and in its functions."""
    model = _load(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    out = []
    _check_graph(model.graph, opset, {}, out)
    for function in model.functions:
        _check_nodes(function.node, opset, {}, out)
    return out


def _check_graph(graph, opset: int, outer: dict, out: list) -> None:
    _check_nodes(graph.node, opset, {**outer, **{t.name: t for t in graph.initializer}}, out)


def _check_nodes(nodes, opset: int, inits: dict, out: list) -> None:
    """Check one scope's nodes; ``inits`` holds the constants visible in it (outer scopes' too)."""
    import onnx
    from onnx import numpy_helper

    inits = dict(inits)
    for node in nodes:  # Constant nodes are constants too
        if node.op_type == "Constant":
            tensor = _constant_tensor(node)
            if tensor is not None:
                inits[node.output[0]] = tensor
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def bad(rule, node, msg):
        out.append(Violation(rule, node.name or node.op_type, msg))

    def type_name(tensor_name):
        t = inits.get(tensor_name)
        return onnx.TensorProto.DataType.Name(t.data_type) if t is not None else None

    for node in nodes:
        for a in node.attribute:  # If / Loop / Scan bodies see this scope's constants
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                _check_graph(sub, opset, inits, out)
        if node.op_type in NOT_EXPLICIT_QUANTIZATION or node.domain not in ("", "ai.onnx"):
            bad("op", node, f"{node.domain + '::' if node.domain else ''}{node.op_type} is not part of TensorRT's "
                            f"explicit quantization; export with form='tensorrt'")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        block = attrs.get("block_size", 0)
        if scale not in inits:
            bad("scale-constant", node, "the scale is computed at run time; TensorRT needs constant scales "
                                        "(a static recipe: w8a8-static, w8a8-smoothquant, fp8-static)")
        else:
            s = numpy_helper.to_array(inits[scale]).astype(np.float64)
            if not np.all(np.isfinite(s)) or np.any(s <= 0):
                bad("scale-value", node, "scales must be finite and positive")
        if zp is None:
            if node.op_type == "QuantizeLinear":
                bad("zero-point-type", node, "no zero point means uint8 output; give a signed zero point 0 (int8)")
            elif type_name(x) is not None and type_name(x) not in SIGNED:
                bad("zero-point-type", node, f"a {type_name(x)} input dequantized without a zero point; "
                                             f"TensorRT takes signed types (INT8, FP8, INT4): quantize symmetrically")
        elif zp not in inits:
            bad("zero-point-constant", node, "the zero point must be a constant")
        else:
            t = inits[zp]
            name = onnx.TensorProto.DataType.Name(t.data_type)
            if name not in SIGNED:
                bad("zero-point-type", node, f"zero point of type {name}; TensorRT takes signed types "
                                             f"(INT8, FP8, INT4) with zero point 0: quantize symmetrically")
            elif np.any(numpy_helper.to_array(t).astype(np.float64) != 0):
                bad("zero-point-value", node, "non-zero zero point; TensorRT's quantization is symmetric")
            need = MIN_OPSET.get(name, 13)
            if block or (scale in inits and numpy_helper.to_array(inits[scale]).size > 1):
                need = max(need, 21 if block else 13)
            if opset < need:
                bad("opset", node, f"{name} Q/DQ{' with block_size' if block else ''} needs opset >= {need}, "
                                   f"the model declares {opset}")
        is_weight = x in inits or (x in producer and producer[x].op_type in ("Transpose", "Reshape")
                                   and producer[x].input[0] in inits)
        scale_size = numpy_helper.to_array(inits[scale]).size if scale in inits else 1
        if node.op_type == "QuantizeLinear" and not is_weight:
            if scale_size != 1:
                bad("activation-per-tensor", node, "activation scale is per axis; TensorRT takes per-tensor "
                                                   "activation scales")
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                bad("placement", node, "a QuantizeLinear must feed DequantizeLinear nodes only")
        if node.op_type == "DequantizeLinear" and not is_weight:
            src = producer.get(x)
            if src is None or src.op_type != "QuantizeLinear":
                bad("placement", node, "an activation DequantizeLinear must read a QuantizeLinear")
            if scale_size != 1:
                bad("activation-per-tensor", node, "activation scale is per axis")
        if node.op_type == "DequantizeLinear" and is_weight:
            rank = len(inits[x].dims) if x in inits else 2
            _check_weight_axis(node, attrs, block, scale_size, rank, consumers, type_name(x), bad)


def _readers(name: str, axis: int, consumers: dict, depth: int = 0):
    """``(consumer, axis as it reads it)`` for the nodes reading tensor ``name`` through layout ops:
    a Transpose moves the axis; after a Reshape it is unknown (None)."""
    import onnx

    for u in consumers.get(name, []):
        if u.op_type == "Transpose" and depth < 8:
            perm = next((list(onnx.helper.get_attribute_value(a)) for a in u.attribute if a.name == "perm"), None)
            yield from _readers(u.output[0], perm.index(axis) if perm else 1 - axis, consumers, depth + 1)
        elif u.op_type == "Reshape":
            yield u, None
        else:
            yield u, axis


def _check_weight_axis(node, attrs, block, scale_size, rank, consumers, qtype, bad):
    axis = attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    readers = list(_readers(node.output[0], axis, consumers))
    if block:
        if qtype not in ("INT4", "UINT4"):
            bad("weight-blocked", node, f"blocked quantization of a {qtype} weight; TensorRT takes it for INT4 only")
        if any(u.op_type == "MatMul" and a is not None and a != 0 for u, a in readers):
            bad("weight-axis", node, f"INT4 blocks must run along K (axis 0 of a [K, N] MatMul weight as the "
                                     f"MatMul reads it), got axis {axis}")
        return
    if scale_size == 1:
        return  # per-tensor weights are legal, if less accurate
    for u, read_axis in readers:
        if u.op_type == "Reshape":
            bad("weight-layout", node, "a Reshape sits between the weight's DequantizeLinear and its consumer, so "
                                       "the per-channel axis cannot be verified; store the weight as its consumer "
                                       "reads it")
            continue
        want = _WEIGHT_AXIS.get(u.op_type)
        if u.op_type == "Gemm":
            trans_b = next((a.i for a in u.attribute if a.name == "transB"), 0)
            want = 0 if trans_b else 1
        if want is not None and len(u.input) > 1 and read_axis != want and \
                u.input[1] in _chain(node.output[0], u, consumers):
            bad("weight-axis", node, f"per-channel weight scales on axis {axis} (axis {read_axis} as {u.op_type} "
                                     f"reads it), but {u.op_type} reads output channels on axis {want}; store the "
                                     f"weight as its consumer reads it")


def _chain(name: str, target, consumers: dict, depth: int = 0) -> set:
    """The tensor names on the layout-op path from ``name`` to node ``target`` (to tell the weight
    input of ``target`` from its activation input)."""
    names = {name}
    for u in consumers.get(name, []):
        if u is not target and u.op_type == "Transpose" and depth < 8:
            names |= _chain(u.output[0], target, consumers, depth + 1)
    return names
