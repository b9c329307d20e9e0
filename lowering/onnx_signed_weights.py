"""INT8 GEMM weights stored signed where this CPU multiplies u8 x s8 exactly (an ORT-form rewrite for the host).

The ort form's ``MatMulIntegerToFloat`` weights are unsigned codes with zero point 128, exact on
every CPU. Where ``runtimes.ort_int8_probe`` finds ONNX Runtime's u8 x s8 product exact (AVX-512
VNNI, AVX-VNNI), the same codes minus 128 with zero point 0 give the same integer products through
a kernel about twice as fast at hundreds of rows (prefill, encoders;
docs/results/cpu_decode_kernels.md). A file exported for deployment keeps the
portable unsigned form.
"""
from __future__ import annotations

import numpy as np
from onnxscript import ir

from qcompiler.lowering.onnx_sibling_matmuls import constant_array

from qcompiler.runtimes.ort_int8_probe import signed_weights_exact

_MMITF = ("com.microsoft", "MatMulIntegerToFloat")
_B, _B_ZP = 1, 5



def signed_int8_weights(model: ir.Model) -> int:
    """Store every unsigned constant ``MatMulIntegerToFloat`` weight of ``model`` (zero point 128)
    as int8 with zero point 0 when this CPU computes that exactly; returns how many were changed."""
    if not signed_weights_exact()[0]:
        return 0
    graph, changed = model.graph, 0
    zero, converted = None, {}  # a weight read by several GEMMs is converted once
    for node in graph:
        if (node.domain, node.op_type) != _MMITF or len(node.inputs) < 6:
            continue
        weight, weight_zero = constant_array(node.inputs[_B]), constant_array(node.inputs[_B_ZP])
        if weight is None or weight.dtype != np.uint8 or weight_zero is None or weight_zero.size != 1 \
                or weight_zero.dtype != np.uint8 or int(weight_zero.reshape(-1)[0]) != 128:
            continue
        if zero is None:
            zero = ir.Value(name="_qc_signed_zero", const_value=ir.tensor(np.asarray(0, np.int8)))
            graph.register_initializer(zero)
        signed = converted.get(id(node.inputs[_B]))
        if signed is None:
            signed = ir.Value(name=f"{node.inputs[_B].name}_s8",
                              const_value=ir.tensor((weight.astype(np.int16) - 128).astype(np.int8)))
            graph.register_initializer(signed)
            converted[id(node.inputs[_B])] = signed
        node.replace_input_with(_B, signed)
        node.replace_input_with(_B_ZP, zero)
        changed += 1
    return changed
