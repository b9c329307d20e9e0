"""Whether this CPU's ONNX Runtime multiplies uint8 activations by int8 weights exactly.

ONNX Runtime's u8 x s8 integer GEMM is twice as fast as its u8 x u8 one at hundreds of rows on a
CPU with AVX-512 VNNI or AVX-VNNI (docs/results/cpu_decode_kernels.md), and exact
there; without VNNI it adds pairs of products in 16 bits and saturates (docs/experiments.md, "ONNX
export"). The ort form therefore stores u8 weights (zero point 128), and the ``ort`` target's
sessions switch to int8 weights where ``signed_weights_exact`` finds the product exact on the
CPU it runs on: one product at the saturating extreme, checked against int64.
"""
from __future__ import annotations

import numpy as np

from qcompiler.runtimes.ort_session import inference_session

_K = 64  # long enough to take the vectorised kernel


def _probe_model():
    from onnx import TensorProto, helper, numpy_helper

    weight = np.tile(np.asarray([[127], [127], [-128], [-128]], np.int8), (_K // 4, 8))
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero", "b_zero"], ["y"])], "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, _K])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [None, 8])],
        [numpy_helper.from_array(weight, "b"), numpy_helper.from_array(np.asarray(0, np.uint8), "a_zero"),
         numpy_helper.from_array(np.asarray(0, np.int8), "b_zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), weight


def signed_weights_exact() -> tuple:
    """(True, "") where u8 x s8 products are exact here, else (False, why)."""
    model, weight = _probe_model()
    session = inference_session(model.SerializeToString(), threads=1)
    a = np.full((16, _K), 255, np.uint8)  # 255 * 127 twice overflows a 16-bit pair sum
    got = session.run(None, {"a": a})[0]
    exact = a.astype(np.int64) @ weight.astype(np.int64)
    if np.array_equal(got, exact):
        return True, ""
    return False, (f"ONNX Runtime's u8 x s8 GEMM saturates on this CPU (no VNNI): off by up to "
                   f"{int(np.abs(got - exact).max())} on a probe product; u8 x u8 weights kept")
