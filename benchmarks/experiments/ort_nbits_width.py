"""ONNX Runtime's 4-bit and 8-bit ``MatMulNBits`` kernels at one row: which is faster, per shape.

For the decode GEMMs of a few decoders (q/k/v and gate/up merged, as the ``ort`` target runs
them; the ``lm_head``), one-node sessions (the ``ort`` target's session options) of ``MatMulNBits``
at accuracy level 4 with group-32 4-bit codes and with the same codes widened to 8 bits (the same
values: a 4-bit GEMM could run either way), timed in ``ROUNDS`` interleaved rounds of ``RUNS``
runs each, a kernel's time the median of its best round; ``--repeats`` such measurements, their
median per kernel.

    python benchmarks/experiments/ort_nbits_width.py [--repeats 3] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from qcompiler.runtimes.ort_session import inference_session

ROUNDS, RUNS = 5, 40

SHAPES = {  # model -> [(K, N) of its decode GEMMs]
    "SmolLM2-135M": [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)],
    "Qwen2-0.5B": [(896, 1152), (896, 896), (896, 9728), (4864, 896)],
    "Llama-3.2-1B": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)],
}


def _session(k: int, n: int, block: int, bits: int):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = k // block
    codes = rng.integers(0, 16, (n, blocks, block), dtype=np.uint8)
    blob = codes + 120 if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = np.full(n * blocks, 0.01, np.float32)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "width", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return inference_session(model.SerializeToString())


def measure(k: int, n: int, block: int) -> dict:
    """{bits: microseconds} of both kernels at one row, interleaved."""
    sessions = {bits: _session(k, n, block, bits) for bits in (4, 8)}
    feeds = {"x": np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)}
    best = {bits: float("inf") for bits in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feeds)
    for round_ in range(ROUNDS):
        for bits in ((4, 8) if round_ % 2 == 0 else (8, 4)):
            times = []
            for _ in range(RUNS):
                t = time.perf_counter()
                sessions[bits].run(None, feeds)
                times.append(time.perf_counter() - t)
            best[bits] = min(best[bits], float(np.median(times)) * 1e6)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    rows = ["| model | K x N | 4-bit us | 8-bit us | 8-bit / 4-bit |", "|---|---|---|---|---|"]
    for model, shapes in SHAPES.items():
        for k, n in shapes:
            found = [measure(k, n, args.block) for _ in range(args.repeats)]
            four, eight = (statistics.median(f[bits] for f in found) for bits in (4, 8))
            rows.append(f"| {model} | {k} x {n} | {four:.1f} | {eight:.1f} | {eight / four:.2f} |")
            print(rows[-1], flush=True)
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from results_page import write_page

        text = __doc__.split("\n\n    python")[0].split("\n", 1)[1].strip()
        write_page(args.markdown, "MatMulNBits at one row: 4-bit codes or the same codes widened to 8 bits",
                   f"{text}\n\nBlocks of {args.block}, threads as the ort target's sessions (ONNX Runtime's "
                   f"default), {args.repeats} repeats.\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
