"""ONNX Runtime's INT8 kernels on this CPU: speed and exactness, the facts the ORT form rests on.

Rows: MatMul shapes of MiniLM (1024 tokens) and SmolLM2 decode; columns: float MatMul,
MatMulInteger with u8 x s8 / s8 x s8 / u8 x u8 (zero point 128) operands over full int8 ranges
(max error against an exact int64 product), and a weight-only DequantizeLinear -> MatMul under
ORT's default QDQ fusions and with them off (max error against float64). Then per-token
quantization (uint8, zero point 128) of [B, S, K] activations as the ort form can write it: one
blocked QuantizeLinear (opset 21, a block per row) against per-axis scales on a 2-D view.

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


def per_token_quantize():
    rng = np.random.default_rng(0)
    print(f"\n{'B x S x K':18} {'per-token QuantizeLinear':34} {'us':>8} {'max error':>12}")
    for b, s_, k in [(1, 1, 576), (1, 256, 576), (8, 128, 384)]:
        x = rng.standard_normal((b, s_, k)).astype(np.float32)
        scale = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float32)
        exact = np.clip(np.round(x / scale) + 128, 0, 255)
        inputs = [h.make_tensor_value_info("x", T.FLOAT, [None, None, k]),
                  h.make_tensor_value_info("s", T.FLOAT, [None, None, 1])]
        zero = [h.make_node("Shape", ["s"], ["s_shape"]), h.make_node("Expand", ["z", "s_shape"], ["zp"])]
        consts = {"z": np.array(128, np.uint8), "flat": np.array([-1], np.int64), "rows": np.array([-1, k], np.int64)}
        forms = {
            "blocked, block = row": zero + [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], axis=2, block_size=k)],
            "per-axis on a [B*S, K] view": zero + [
                h.make_node("Reshape", ["x", "rows"], ["x2"]), h.make_node("Reshape", ["s", "flat"], ["s1"]),
                h.make_node("Reshape", ["zp", "flat"], ["z1"]),
                h.make_node("QuantizeLinear", ["x2", "s1", "z1"], ["y2"], axis=0),
                h.make_node("Shape", ["x"], ["x_shape"]), h.make_node("Reshape", ["y2", "x_shape"], ["y"])]}
        # as the ort target runs them (workers spinning during a run only); the forms interleaved,
        # median of 300 runs each
        spin = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
        sessions = {name: session(nodes, inputs, [nh.from_array(v, n) for n, v in consts.items()
                                                  if any(n in node.input for node in nodes)], **spin)
                    for name, nodes in forms.items()}
        feeds = {"x": x, "s": scale}
        times = {name: [] for name in forms}
        for _ in range(300):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t)
        for name, s in sessions.items():
            err = np.abs(s.run(None, feeds)[0].astype(np.int64) - exact).max()
            print(f"{f'{b}x{s_}x{k}':18} {name:34} {1e6 * np.median(times[name]):8.1f} {err:12.4g}", flush=True)


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
    per_token_quantize()


if __name__ == "__main__":
    main()
