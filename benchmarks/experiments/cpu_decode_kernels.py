"""ONNX Runtime's INT8 / INT4 GEMM kernels at decode and prefill row counts, on this CPU.

For SmolLM2-135M's linear shapes (merged q/k/v, o, merged gate/up, down, the tied lm_head) and
M rows of float activations, each form as a one-GEMM ONNX model run by ONNX Runtime (2 threads,
with the ``ort`` target's session options): the float ``MatMul``; the ort form's w8a8 linear
(per-token quantization, ``MatMulIntegerToFloat``, the token-scale ``Mul``) with unsigned and
with signed weights; the same with the rounding residual quantized again per token and both
int8 halves through one ``MatMulIntegerToFloat`` of 2M rows (the ``w8a8-blocks`` prefill form);
``MatMulNBits`` 8-bit and 4-bit at accuracy levels 0 (float activations) and 4 (int8 activations
per block of 64, and 8-bit at blocks of 32: the ``w8a8-blocks`` decode form). Median microseconds of ``--runs`` runs and the relative error of
the output against float64. The facts ``lowering.onnx_decode_gemv`` and
``lowering.onnx_signed_weights`` rest on.

    python benchmarks/experiments/cpu_decode_kernels.py [--rows 1 4 16 256] [--threads 2] [--runs 200]
                                                         [--markdown docs/results/cpu_decode_kernels.md]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qcompiler.runtimes.ort_session import inference_session

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]  # (K, N)


def session(nodes, k, inits, threads):
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [None, k])],
                         [onnx.ValueInfoProto(name="y")], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    return inference_session(model.SerializeToString(), threads=threads)


def per_token_w8a8(k, wq, w_scale, signed, threads):
    """The ort form's w8a8 linear as ``lowering.onnx_ops`` writes it (NaN carrier left out)."""
    nodes = [h.make_node("Abs", ["x"], ["a"]), h.make_node("ReduceMax", ["a", "axis"], ["amax"], keepdims=1),
             h.make_node("Div", ["amax", "q127"], ["s"]), h.make_node("Shape", ["s"], ["s_shape"]),
             h.make_node("Expand", ["z", "s_shape"], ["zp"]),
             h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], axis=-1, block_size=k),
             h.make_node("MatMulIntegerToFloat", ["xq", "w", "one", "w_scale", "z", "w_zero"], ["y0"], domain="com.microsoft"),
             h.make_node("Mul", ["y0", "s"], ["y"])]
    weight = wq.T.copy() if signed else (wq.T.astype(np.int16) + 128).astype(np.uint8)
    w_zero = np.asarray(0, np.int8) if signed else np.asarray(128, np.uint8)
    inits = [nh.from_array(np.asarray([-1], np.int64), "axis"), nh.from_array(np.asarray(127, np.float32), "q127"),
             nh.from_array(np.asarray(128, np.uint8), "z"), nh.from_array(weight, "w"),
             nh.from_array(np.asarray(1, np.float32), "one"), nh.from_array(w_scale, "w_scale"),
             nh.from_array(w_zero, "w_zero")]
    return session(nodes, k, inits, threads)


def two_pass_w8a8(k, wq, w_scale, threads):
    """The ort form of ``w8a8-blocks`` at more than one row: per-token int8 codes of x (t = x / s,
    s = amax / 127; codes round(t)), then codes of what that rounding left, on a grid 254 times
    finer (round((t - round(t)) * 254)), each through a u8 x s8 ``MatMulIntegerToFloat`` (the
    second with activation scale 1/254), the two added and scaled by the token scales (NaN
    carrier left out)."""
    nodes = [h.make_node("Abs", ["x"], ["a"]), h.make_node("ReduceMax", ["a", "axis"], ["amax0"], keepdims=1),
             h.make_node("Max", ["amax0", "tiny"], ["amax"]), h.make_node("Div", ["amax", "q127"], ["s"]),
             h.make_node("Div", ["x", "s"], ["t"]), h.make_node("Round", ["t"], ["hi"]),
             h.make_node("QuantizeLinear", ["hi", "one", "z"], ["q1"]), h.make_node("Sub", ["t", "hi"], ["lo"]),
             h.make_node("QuantizeLinear", ["lo", "fine", "z"], ["q2"]),
             h.make_node("MatMulIntegerToFloat", ["q1", "w", "one", "w_scale", "z", "w_zero"], ["y1"], domain="com.microsoft"),
             h.make_node("MatMulIntegerToFloat", ["q2", "w", "fine", "w_scale", "z", "w_zero"], ["y2"], domain="com.microsoft"),
             h.make_node("Add", ["y1", "y2"], ["y0"]), h.make_node("Mul", ["y0", "s"], ["y"])]
    inits = [nh.from_array(np.asarray([-1], np.int64), "axis"), nh.from_array(np.asarray(127, np.float32), "q127"),
             nh.from_array(np.asarray(1e-30, np.float32), "tiny"), nh.from_array(np.asarray(128, np.uint8), "z"),
             nh.from_array(wq.T.copy(), "w"), nh.from_array(np.asarray(1, np.float32), "one"),
             nh.from_array(np.asarray(1 / 254, np.float32), "fine"),
             nh.from_array(w_scale, "w_scale"), nh.from_array(np.asarray(0, np.int8), "w_zero")]
    return session(nodes, k, inits, threads)


def nbits(k, n, w, bits, block, level, threads):
    blocks = k // block
    wb = w.reshape(n, blocks, block)
    if bits == 8:  # per-channel scales, repeated per block (the w8a8 recipe's weights)
        scale = np.repeat((np.abs(w).max(1) / 127).astype(np.float32)[:, None], blocks, 1)
        blob = (np.clip(np.round(wb / scale[..., None]), -127, 127) + 128).astype(np.uint8)
    else:
        scale = (np.abs(wb).max(-1) / 7).astype(np.float32)
        codes = (np.clip(np.round(wb / scale[..., None]), -8, 7) + 8).astype(np.uint8)
        blob = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    node = h.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                       block_size=block, accuracy_level=level)
    return session([node], k, [nh.from_array(blob, "B"), nh.from_array(scale.reshape(-1), "S")], threads)


def timed(s, x, runs):
    feeds = {"x": x}
    for _ in range(3):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        y = s.run(None, feeds)[0]
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e6, y


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 256])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--markdown", help="also write the table to this page")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'M':>4} {'K':>5} {'N':>6}  {'form':44} {'us':>9} {'rel. error':>10}")
    for m in args.rows:
        for k, n in SHAPES:
            x = rng.standard_normal((m, k)).astype(np.float32)
            w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
            exact = x.astype(np.float64) @ w.T.astype(np.float64)
            w_scale = (np.abs(w).max(1) / 127).astype(np.float32)
            wq = np.clip(np.round(w / w_scale[:, None]), -127, 127).astype(np.int8)
            forms = {"float MatMul": session([h.make_node("MatMul", ["x", "wt"], ["y"])], k,
                                             [nh.from_array(w.T.copy(), "wt")], args.threads),
                     "w8a8 per token, MatMulIntegerToFloat u8 x u8": per_token_w8a8(k, wq, w_scale, False, args.threads),
                     "w8a8 per token, MatMulIntegerToFloat u8 x s8": per_token_w8a8(k, wq, w_scale, True, args.threads),
                     "w8a8 two passes per token, one u8 x s8 MatMulIntegerToFloat": two_pass_w8a8(k, wq, w_scale, args.threads),
                     "MatMulNBits 8-bit block 32, accuracy level 4": nbits(k, n, w, 8, 32, 4, args.threads)}
            for bits in (8, 4):
                for level in (0, 4):
                    if bits == 8 and level == 0 and n * k > 10**7:
                        continue  # minutes per run
                    forms[f"MatMulNBits {bits}-bit block 64, accuracy level {level}"] = nbits(k, n, w, bits, 64, level, args.threads)
            runs = args.runs if m * n * k < 10**9 else max(3, args.runs // 40)
            for name, s in forms.items():
                us, y = timed(s, x, runs)
                err = np.linalg.norm(y - exact) / np.linalg.norm(exact)
                print(f"{m:4} {k:5} {n:6}  {name:44} {us:9.1f} {err:10.2e}", flush=True)
                rows.append(f"| {m} | {k} x {n} | {name} | {us:.1f} | {err:.2e} |")
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from results_page import write_page

        body = (__doc__.split("\n\n    python")[0].split("\n", 1)[1].strip() + "\n\n"
                + f"{args.threads} threads, median of {args.runs} runs (fewer for the largest GEMMs).\n\n"
                + "| rows M | K x N | form | microseconds | error vs float64 |\n|---|---|---|---|---|\n"
                + "\n".join(rows))
        write_page(args.markdown, "ONNX Runtime GEMM kernels at decode and prefill row counts", body)


if __name__ == "__main__":
    main()
