"""The TensorRT explicit-quantization conformance checker for exported ONNX graphs.

``check(model)`` walks a graph and returns one ``Violation`` per broken rule; an empty list
means TensorRT's explicit-quantization rules (as its developer guide states them) hold:

* Q/DQ zero points are constant and 0, of a signed type (INT8, FP8 E4M3, INT4);
* scales are constant, finite and positive; activation scales are per tensor;
* weight DequantizeLinear is per channel on the output-channel axis of the weight as its
  consumer reads it (MatMul ``[K, N]``: axis 1; Gemm with ``transB=1`` and Conv: axis 0),
  or blocked along K for INT4 (opset 21);
* every QuantizeLinear feeds DequantizeLinears only, and every activation DequantizeLinear
  reads a QuantizeLinear (TensorRT fuses Q/DQ pairs; a lone Q or DQ is not a placement it takes);
* no integer-arithmetic or ONNX Runtime contrib op (MatMulInteger, MatMulNBits, ...);
* the default-domain opset is high enough for the types used (per-axis: 13, FP8: 19, INT4: 21).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np

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
    import onnx

    return onnx.load(model) if isinstance(model, str) else model


def check(model: Union[str, "onnx.ModelProto"]) -> list:
    """Every TensorRT explicit-quantization violation in ``model`` (a path or ModelProto)."""
    import onnx
    from onnx import numpy_helper

    model = _load(model)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:  # Constant nodes are constants too
        if node.op_type == "Constant" and node.attribute:
            inits[node.output[0]] = node.attribute[0].t
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []

    def bad(rule, node, msg):
        out.append(Violation(rule, node.name or node.op_type, msg))

    def type_name(tensor_name):
        t = inits.get(tensor_name)
        return onnx.TensorProto.DataType.Name(t.data_type) if t is not None else None

    for node in graph.node:
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
            qtype = type_name(x) if node.op_type == "DequantizeLinear" else "UINT8"
            if qtype not in SIGNED and node.op_type == "QuantizeLinear":
                bad("zero-point-type", node, "no zero point means uint8 output; give a signed zero point 0 (int8)")
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
    return out


def _check_weight_axis(node, attrs, block, scale_size, rank, consumers, qtype, bad):
    users = consumers.get(node.output[0], [])
    axis = attrs.get("axis", 1)
    axis = axis + rank if axis < 0 else axis
    if block:
        if qtype not in ("INT4", "UINT4"):
            bad("weight-blocked", node, f"blocked quantization of a {qtype} weight; TensorRT takes it for INT4 only")
        if any(u.op_type == "MatMul" and u.input[1] == node.output[0] for u in users) and axis != 0:
            bad("weight-axis", node, f"INT4 blocks must run along K (axis 0 of a [K, N] MatMul weight), got axis {axis}")
        return
    if scale_size == 1:
        return  # per-tensor weights are legal, if less accurate
    for u in users:
        want = _WEIGHT_AXIS.get(u.op_type)
        if u.op_type == "Gemm":
            trans_b = next((a.i for a in u.attribute if a.name == "transB"), 0)
            want = 0 if trans_b else 1
        if want is not None and u.input[1] == node.output[0] and axis != want:
            bad("weight-axis", node, f"per-channel weight scales on axis {axis}, but {u.op_type} reads output "
                                     f"channels on axis {want}; store the weight as its consumer reads it")
