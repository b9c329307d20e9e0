"""A weight-only INT8 recipe's many-row GEMMs through the ``ort`` target: two per-token int8 passes
on the stored codes (``lowering.onnx_weight_only_int8``, the target's choice where u8 x s8 is
exact) against the float GEMM of the dequantized weight that ONNX Runtime folds into a float32 copy.

Each workload of ``benchmarks/cpu_speed.py`` (SmolLM2 prefill of 256 tokens, MiniLM 8x128 and
1x32) is compiled twice in one process, with and without the rewrite (``onnx_fusions.HOST_FUSIONS``
without it, an empty export cache and in-process session cache for each, so the second compile
cannot reuse the first's file); the two are then called in turn, each call timed after an untimed
one. Median milliseconds of ``--rounds`` rounds, the accuracy column of ``cpu_speed.py``, and the
bytes of the GEMM weights each session's file holds (INT8 codes, or the INT8 codes ONNX Runtime
expands to float32 when the session loads: four bytes per weight in memory).

    python benchmarks/experiments/weight_only_prompt_kernels.py [--recipe w8a16] [--workload REGEX] [--rounds 9] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_page import write_page  # noqa: E402

VARIANTS = {"two int8 passes (the target)": True, "float GEMM of the dequantized weight": False}


def _gemm_weight_mib(fn) -> tuple:
    """(MiB of INT8 GEMM weights the sessions read as codes, MiB they expand to float32 at load)."""
    import onnx

    from qcompiler.api.backend import compiled_graphs

    codes = expanded = 0
    for g in compiled_graphs(fn):
        if g.running_target != "ort":
            continue
        model = g.fn.session.graph
        sizes = {t.name: (t.data_type, math.prod(t.dims)) for t in model.graph.initializer}
        casts = {n.input[0] for n in model.graph.node if n.op_type == "Cast"}
        casts |= {n.input[0] for n in model.graph.node if n.op_type == "Transpose" and n.output[0] in casts}
        for name, (dtype, size) in sizes.items():
            if dtype in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and size >= 4096:
                if name in casts:
                    expanded += 4 * size
                else:
                    codes += size
    return codes / 2**20, expanded / 2**20


def measure(recipe: str, pattern: str, rounds: int):
    import torch

    import cpu_speed
    import qcompiler
    from qcompiler.lowering import onnx_fusions, ort
    from qcompiler.lowering.onnx_weight_only_int8 import two_pass_weight_only_int8

    full = list(onnx_fusions.HOST_FUSIONS["ort"])
    caches = tempfile.mkdtemp()  # the sessions read their files from here until the end
    for name, (model, call, calib, accuracy) in cpu_speed.workloads(False, pattern).items():
        qcompiler.calibrate(model, calib, progress=False)
        built = {}
        for label, rewrite in VARIANTS.items():
            onnx_fusions.HOST_FUSIONS["ort"] = full if rewrite else [f for f in full if f is not two_pass_weight_only_int8]
            ort._SESSIONS.clear()
            torch._dynamo.reset()
            os.environ["QCOMPILE_CACHE"] = tempfile.mkdtemp(dir=caches)
            fn = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": "ort"})
            step = call(fn)
            with torch.no_grad():
                step()
            built[label] = (fn, step, accuracy(fn) if accuracy else "", _gemm_weight_mib(fn))
        onnx_fusions.HOST_FUSIONS["ort"] = full
        times = {label: [] for label in built}
        with torch.no_grad():
            for _ in range(rounds):
                for label, (_, step, _, _) in built.items():
                    step()
                    start = time.perf_counter()
                    step()
                    times[label].append(time.perf_counter() - start)
        for label, (_, _, acc, (codes, expanded)) in built.items():
            yield (f"| {name} | {recipe} | {label} | {statistics.median(times[label]) * 1e3:.2f} | "
                   f"{codes:.1f} | {expanded:.1f} | {acc} |")
        torch._dynamo.reset()
    shutil.rmtree(caches, ignore_errors=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="w8a16")
    p.add_argument("--workload", default="prefill|MiniLM")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for row in measure(args.recipe, args.workload, args.rounds):
        rows.append(row)
        print(row, flush=True)
    header = ("| workload | recipe | GEMMs of many rows | median ms | INT8 weights read as codes MiB | "
              "INT8 weights expanded to float32 at load MiB | accuracy vs FP32 |")
    table = "\n".join([header, "|---|---|---|---|---|---|---|", *rows])
    body = (__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip()
            + f"\n\n{args.threads} threads, median of {args.rounds} rounds.\n\n" + table)
    if args.markdown:
        write_page(args.markdown, "Weight-only INT8 GEMMs of many rows: two int8 passes or a float GEMM", body)


if __name__ == "__main__":
    main()
