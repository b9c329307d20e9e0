"""One ONNX Runtime decode step of SmolLM2-135M w8a8, as the ``ort`` target exports it: what the
file layout and the graph fusions cost or save, and the tied ``lm_head`` alone.

Exports the decode graph of ``generate()`` (``dynamic=True``, as the README compiles it) three
times: with every ``onnx_fusions.GRAPH_FUSIONS`` rewrite (the q/k/v and gate/up GEMMs merged, RoPE
as one op, the head splits and the cache's ``Concat`` folded into a 3-D ``Attention``), without
the attention fold, and without any of them. Then it times each file's session on a cache of
``--cache-len`` tokens, in a process of its own per file and round (the files' rounds in turn):
its creation, the median step of ``--runs``, and the process's peak resident memory. The fused
file is also timed with its weights inline (one protobuf) against the side file
(``<name>.data``) the cache keeps. Last, the ``lm_head`` shape (1 x 576 x 49152, FP32) as one
ONNX Runtime ``MatMul`` against torch's ``F.linear``.

    python benchmarks/experiments/ort_decode_session.py [--threads 2] [--cache-len 200] [--runs 200]
                                                        [--rounds 2] [--markdown docs/results/ort_decode_session.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _peak_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1e6 for line in f if line.startswith("VmHWM"))


# label -> the graph fusions the export keeps (None: all of them)
VARIANTS = {"all graph fusions": None,
            "without the attention fold": "fold_attention_heads",
            "without graph fusions (GEMMs merged, RoPE, attention)": "*"}


def export(folder: str, variant: str) -> None:
    """Compile SmolLM2 w8a8 and generate two tokens: the prefill and decode files land in ``folder``."""
    os.environ["QCOMPILE_CACHE"] = folder
    import torch

    from qcompiler.bundled import zoo
    from qcompiler.lowering import onnx_fusions

    dropped = VARIANTS[variant]
    if dropped is not None:
        onnx_fusions.GRAPH_FUSIONS["ort"] = [f for f in onnx_fusions.GRAPH_FUSIONS["ort"]
                                             if dropped != "*" and f.__name__ != dropped]
    lm, tok = zoo.load_smollm2()
    lm.forward = torch.compile(lm.forward, backend="qcompile", options={"recipe": "w8a8"}, dynamic=True)
    ids = tok("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        lm.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)


def time_session(path: str, threads: int, cache_len: int, runs: int) -> dict:
    import numpy as np

    from qcompiler.runtimes.ort_session import inference_session

    t = time.perf_counter()
    session = inference_session(path, threads=threads)
    made = time.perf_counter() - t
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [cache_len if isinstance(d, str) or d is None else d for d in i.shape]
        feeds[i.name] = np.zeros(shape, np.int64) if "int64" in i.type else rng.standard_normal(shape, np.float32)
    for _ in range(5):
        session.run(None, feeds)
    steps = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        steps.append(time.perf_counter() - t)
    return {"session_s": made, "step_ms": 1e3 * sorted(steps)[runs // 2], "peak_gb": _peak_gb()}


def lm_head(threads: int, runs: int) -> dict:
    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.runtimes.ort_session import inference_session

    torch.set_num_threads(threads)
    n, k = 49152, 576
    w = (np.random.default_rng(0).standard_normal((n, k), np.float32) * 0.02)
    x = np.ones((1, 1, k), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "lm_head",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = inference_session(model.SerializeToString(), threads=threads)
    tw, tx = torch.from_numpy(w), torch.from_numpy(x)
    out = {}
    for name, fn in (("ORT MatMul", lambda: session.run(None, {"x": x})),
                     ("torch F.linear", lambda: torch.nn.functional.linear(tx, tw))):
        for _ in range(5):
            fn()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = 1e3 * sorted(times)[runs // 2]
    return out


def _child(*args) -> dict:
    run = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(line[len("RESULT "):])


def _decode_file(folder: str) -> str:
    """The decode graph's file: the one that takes the KV cache as inputs."""
    import onnx

    files = [os.path.join(folder, "onnx", f) for f in os.listdir(os.path.join(folder, "onnx")) if f.endswith(".onnx")]
    return max(files, key=lambda f: len(onnx.load(f, load_external_data=False).graph.input))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-len", type=int, default=200)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2, help="timing processes per file, the files in turn")
    parser.add_argument("--markdown", help="write the table to this page (stamped)")
    parser.add_argument("--export", nargs=2, help=argparse.SUPPRESS)  # internal: folder, variant
    parser.add_argument("--time", help=argparse.SUPPRESS)  # internal: an ONNX file
    parser.add_argument("--lm-head", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export:
        export(args.export[0], args.export[1])
        print("RESULT {}")
        return
    if args.time:
        print("RESULT " + json.dumps(time_session(args.time, args.threads, args.cache_len, args.runs)))
        return
    if args.lm_head:
        print("RESULT " + json.dumps(lm_head(args.threads, args.runs)))
        return
    import onnx

    from qcompiler.bundled import zoo

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for index, variant in enumerate(VARIANTS):
            folder = os.path.join(tmp, str(index))
            os.makedirs(folder)
            for name in ("smollm2-135m-fp32",):  # the converted model is data, not a compiled artifact
                if (zoo.cache_dir() / name).exists():
                    os.symlink(zoo.cache_dir() / name, os.path.join(folder, name))
            _child("--export", folder, variant)
            files[f"{variant}, weights in a side file"] = _decode_file(folder)
        inline = os.path.join(tmp, "inline.onnx")
        onnx.save(onnx.load(files["all graph fusions, weights in a side file"]), inline)
        files["all graph fusions, weights inline"] = inline
        common = ["--threads", str(args.threads), "--cache-len", str(args.cache_len), "--runs", str(args.runs)]
        timed = {label: [] for label in files}
        for _ in range(args.rounds):
            for label, path in files.items():
                timed[label].append(_child("--time", path, *common))
                print(label, timed[label][-1], file=sys.stderr, flush=True)
        for label, path in files.items():
            rounds = timed[label]
            rows[label] = {"nodes": len(onnx.load(path, load_external_data=False).graph.node),
                           "steps": [r["step_ms"] for r in rounds], "session_s": max(r["session_s"] for r in rounds),
                           "peak_gb": max(r["peak_gb"] for r in rounds)}
        head = _child("--lm-head", *common)
    lines = [f"SmolLM2-135M w8a8 decode step, cache {args.cache_len} tokens, {args.threads} threads; step: the "
             f"median of {args.runs} steps in each of {args.rounds} processes (the files in turn); session and "
             "peak: the largest over those processes (peak: the resident memory of the process that made and "
             "ran the session).", "",
             "| file | nodes | step ms per round | session s | peak GB |", "|---|---|---|---|---|"]
    lines += [f"| {label} | {r['nodes']} | {' / '.join(f'{s:.2f}' for s in r['steps'])} | {r['session_s']:.2f} "
              f"| {r['peak_gb']:.2f} |" for label, r in rows.items()]
    lines += ["", "lm_head 1 x 576 x 49152 FP32: " + ", ".join(f"{k} {v:.2f} ms" for k, v in head.items())]
    body = "\n".join(lines)
    print(body)
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from results_page import write_page

        write_page(args.markdown, "ONNX Runtime decode step: file layout and graph fusions",
                   f"{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0].strip()}\n\n{body}\n")


if __name__ == "__main__":
    main()
