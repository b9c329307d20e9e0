"""ONNX Runtime's INT8 kernels on this CPU: speed and exactness, the facts the ORT form rests on.

Rows: MatMul shapes of MiniLM (1024 tokens) and SmolLM2 decode; columns: float MatMul,
MatMulInteger with u8 x s8 / s8 x s8 / u8 x u8 (zero point 128) operands over full int8 ranges
(max error against an exact int64 product), and a weight-only DequantizeLinear -> MatMul under
ORT's default QDQ fusions and with them off (max error against float64).

    python benchmarks/ort_int8_kernels.py
"""
from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def session(nodes, inputs, inits, **config):
    import onnx

    model = h.make_model(h.make_graph(nodes, "g", inputs, [onnx.ValueInfoProto(name="y")], inits),
                         opset_imports=[h.make_opsetid("", 21)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def timed(s, feeds, n=20) -> tuple:
    y = s.run(None, feeds)[0]
    t = time.perf_counter()
    for _ in range(n):
        s.run(None, feeds)
    return y, (time.perf_counter() - t) / n * 1e3


def main():
    rng = np.random.default_rng(0)
    print(f"{'M x K x N':18} {'kernel':34} {'ms':>8} {'max error':>12}")
    for m, k, n in [(1024, 384, 1536), (1024, 1536, 384), (1, 576, 1536)]:
        xf = rng.standard_normal((m, k)).astype(np.float32)
        wq = rng.integers(-127, 128, (k, n))
        xq = rng.integers(-128, 128, (m, k))
        exact = xq @ wq
        ws = (rng.random(n) * 0.01 + 0.001).astype(np.float32)
        wf = (wq * ws).astype(np.float32)
        rows = []
        s = session([h.make_node("MatMul", ["x", "w"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [None, k])],
                    [nh.from_array(wf, "w")])
        y, ms = timed(s, {"x": xf})
        rows.append(("float MatMul", ms, np.abs(y - xf.astype(np.float64) @ wf.astype(np.float64)).max()))
        for name, a, b, az, bz, at in [
                ("MatMulInteger u8 x s8", xq + 128, wq.astype(np.int8), np.uint8(128), None, T.UINT8),
                ("MatMulInteger s8 x s8", xq.astype(np.int8), wq.astype(np.int8), None, None, T.INT8),
                ("MatMulInteger u8 x u8 (zp 128)", xq + 128, (wq + 128).astype(np.uint8), np.uint8(128), np.uint8(128), T.UINT8)]:
            inits = [nh.from_array(b, "w")] + [nh.from_array(np.asarray(v), nm) for v, nm in ((az, "az"), (bz, "bz")) if v is not None]
            names = ["x", "w"] + ["az"] * (az is not None) + ["bz"] * (bz is not None)  # zero points in order
            s = session([h.make_node("MatMulInteger", names, ["y"])],
                        [h.make_tensor_value_info("x", at, [None, k])], inits)
            y, ms = timed(s, {"x": a.astype(np.uint8 if at == T.UINT8 else np.int8)})
            rows.append((name, ms, np.abs(y.astype(np.int64) - exact).max()))
        dq = [h.make_node("DequantizeLinear", ["wq", "ws", "zp"], ["w"], axis=1), h.make_node("MatMul", ["x", "w"], ["y"])]
        dq_inits = [nh.from_array(wq.astype(np.int8), "wq"), nh.from_array(ws, "ws"), nh.from_array(np.zeros(n, np.int8), "zp")]
        ref = xf.astype(np.float64) @ (wq * ws.astype(np.float64))
        for name, cfg in [("DQ -> MatMul, ORT defaults", {}), ("DQ -> MatMul, disable_quant_qdq", {"session.disable_quant_qdq": "1"})]:
            s = session(dq, [h.make_tensor_value_info("x", T.FLOAT, [None, k])], dq_inits, **cfg)
            y, ms = timed(s, {"x": xf})
            rows.append((name, ms, np.abs(y - ref).max()))
        for name, ms, err in rows:
            print(f"{f'{m}x{k}x{n}':18} {name:34} {ms:8.3f} {err:12.4g}", flush=True)
    print("(integer rows: error against the exact int64 product; float rows: against float64; "
          "DQ rows' outputs are of magnitude ~5)")


if __name__ == "__main__":
    main()
