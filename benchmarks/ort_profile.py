"""Where ONNX Runtime spends its time: per-op-type totals of a profiled session (issue 3's
"profile the session" step), for MiniLM 8 x 128 exported FP32 and with qcompile recipes (ORT form).

    python benchmarks/ort_profile.py [--recipes fp32 w8a8 w8a8-smoothquant w8a16] [--runs 5]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch

import qcompiler
from qcompiler import zoo
from qcompiler.runtimes.ort_session import session_options


def profile(path: str, feeds: dict, runs: int) -> collections.Counter:
    import onnxruntime as ort

    so = session_options()
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(os.path.dirname(path), "prof")
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    s.run(None, feeds)
    for _ in range(runs):
        s.run(None, feeds)
    trace = json.load(open(s.end_profiling()))
    per_op = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / (runs + 1)
    return per_op


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipes", nargs="+", default=["fp32", "w8a8", "w8a8-smoothquant", "w8a16"])
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    model, tok = zoo.load_minilm()
    calib_s, held = zoo.wiki_sentences(32, 16)
    enc = lambda s: dict(tok(s, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    batch = {k: v for k, v in enc(held[:8]).items() if k in ("input_ids", "attention_mask")}
    calib = [{k: v for k, v in enc(calib_s[i:i + 8]).items() if k in batch} for i in range(0, 32, 8)]
    qcompiler.calibrate(model, calib, progress=False)
    feeds = {k: v.numpy() for k, v in batch.items()}
    with tempfile.TemporaryDirectory() as d:
        for recipe in args.recipes:
            path = os.path.join(d, f"{recipe}.onnx")
            opts = {"skip": ["*"]} if recipe == "fp32" else {}
            qcompiler.export_onnx(model, batch, path, recipe="w8a8" if recipe == "fp32" else recipe, form="ort",
                                  options=opts)
            per_op = profile(path, feeds, args.runs)
            total = sum(per_op.values())
            top = ", ".join(f"{op} {ms:.1f}" for op, ms in per_op.most_common(8))
            print(f"{recipe:18} kernels {total:7.1f} ms/run: {top}", flush=True)


if __name__ == "__main__":
    main()
