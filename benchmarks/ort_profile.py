"""Where ONNX Runtime spends its time: per-op-type totals of profiled sessions (the
"profile the session" step), with qcompile recipes in the ORT form and FP32 ("fp32": the same
graph with nothing quantized).

Workloads: ``minilm`` (all-MiniLM-L6-v2, batch x tokens from ``--shape``, default 8 x 128,
exported with ``export_onnx``; recipes ``peer`` and ``peer-reduce-range`` are the FP32 export
through ORT's ``quantize_dynamic``, as in benchmarks/cpu_speed.py) and
``decode`` (SmolLM2-135M, one token after a 256-token prompt, through
``torch.compile(..., options={"target": "ort"})``; every ORT session of the step is profiled and
their kernel times added).

    python benchmarks/ort_profile.py [--workload minilm|decode] [--shape 8 128] [--recipes fp32 w8a8 ...] [--runs 5]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import torch

from qcompiler.api.backend import compiled_graphs
from qcompiler.bundled import zoo
from qcompiler.runtimes.ort_session import inference_session, session_options
import qcompiler


def profiled_session(path_or_bytes, prefix: str):
    so = session_options()
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return inference_session(path_or_bytes, so)


def per_op(session, runs: int) -> collections.Counter:
    """Kernel milliseconds per op type per run, from ``session``'s profile of ``runs`` runs."""
    trace = json.load(open(session.end_profiling()))
    totals = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return totals


PEERS = {"peer": {}, "peer-reduce-range": {"reduce_range": True}}


def minilm(recipes, runs: int, d: str, shape=(8, 128)):
    model, tok = zoo.load_minilm()
    rows, tokens = shape
    calib_s, held = zoo.wiki_sentences(32, 16)
    enc = lambda s: dict(tok(s, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt"))
    batch = {k: v for k, v in enc(held[:rows]).items() if k in ("input_ids", "attention_mask")}
    # calibration batches as benchmarks/cpu_speed.py makes them: 4 of 8 x 128, 8 of 1 x 32
    calib = [{k: v for k, v in enc(calib_s[i:i + rows]).items() if k in batch}
             for i in range(0, min(32, 8 * rows), rows)]
    qcompiler.calibrate(model, calib, progress=False)
    feeds = {k: v.numpy() for k, v in batch.items()}
    for recipe in recipes:
        path = os.path.join(d, f"{recipe}.onnx")
        fp32 = recipe == "fp32" or recipe in PEERS
        qcompiler.export_onnx(model, batch, path, recipe="w8a8" if fp32 else recipe, form="ort",
                              options={"skip": ["*"]} if fp32 else {})
        if recipe in PEERS:
            from cpu_speed import peer_quantize  # this folder is on sys.path when run as a script

            peer_quantize(path, path + ".peer", **PEERS[recipe])
            path += ".peer"
        s = profiled_session(path, os.path.join(d, recipe))
        for _ in range(runs + 1):
            s.run(None, feeds)
        yield recipe, per_op(s, runs + 1)


def decode(recipes, runs: int, d: str):
    lm, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib_w, held_w = zoo.lm_windows(ids, 256, 4, 4)
    qcompiler.calibrate(lm, [{"input_ids": w[None]} for w in calib_w], progress=False)
    with torch.no_grad():
        past = lm(input_ids=held_w[:1], use_cache=True).past_key_values
    nxt = held_w[1:2, :1]
    for recipe in recipes:
        options = {"recipe": "w8a8", "skip": ["*"]} if recipe == "fp32" else {"recipe": recipe}
        fn = torch.compile(lm, backend="qcompile", options={**options, "target": "ort"})
        with torch.no_grad():
            for _ in range(2):  # the second call may recompile (Dynamo guards on the cache's state)
                fn(input_ids=nxt, past_key_values=past, use_cache=True)
                past.crop(-1)
            graphs = [g for g in compiled_graphs(fn) if g.running_target == "ort"]
            for i, g in enumerate(graphs):  # the same model, now profiled
                g.fn.session.session = profiled_session(g.fn.session.model.SerializeToString(),
                                                        os.path.join(d, f"{recipe}-{i}"))
            for _ in range(runs):
                fn(input_ids=nxt, past_key_values=past, use_cache=True)
                past.crop(-1)
        total = collections.Counter()
        for g in graphs:
            total.update(per_op(g.fn.session.session, runs))
        yield recipe, total
        torch._dynamo.reset()


WORKLOADS = {"minilm": minilm, "decode": decode}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="minilm")
    p.add_argument("--recipes", nargs="+", default=["fp32", "w8a8", "w8a8-smoothquant", "w8a16"])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--shape", type=int, nargs=2, default=[8, 128], help="minilm: batch, tokens")
    args = p.parse_args(argv)
    extra = {"shape": tuple(args.shape)} if args.workload == "minilm" else {}
    with tempfile.TemporaryDirectory() as d:
        for recipe, ops in WORKLOADS[args.workload](args.recipes, args.runs, d, **extra):
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in ops.most_common(10))
            print(f"{recipe:18} kernels {sum(ops.values()):7.2f} ms/run: {top}", flush=True)


if __name__ == "__main__":
    main()
