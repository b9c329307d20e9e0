"""The ``ort`` target's session settings, each against ONNX Runtime's default: the facts
``runtimes/ort_slow_fusions.py`` and ``runtimes/denormals.py`` rest on.

Two tables, 2 threads (the ``ort`` target's session options), medians:

* kernels: ``norm(x + r)`` on ``[B, S, C]`` float32, a LayerNormalization (with bias) or an
  RMSNormalization, the sum an output of the model or not (a pre-norm decoder's residual stream or
  a post-norm encoder's), run with ONNX Runtime's rewrites all on (its default: ``SkipLayerNormFusion``
  makes the pair one ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``) and with
  that rewrite off; whether the fused op ran, microseconds;
* models: the ``ort`` target's sessions of MiniLM (8 x 128, 1 x 32) and SmolLM2-135M (a decode step
  on a cache of 256, a 256-token prefill), FP32 and quantized, each made four times from the same
  file: ONNX Runtime's defaults (every rewrite on, denormals kept); the rewrites ``SLOW_FUSIONS``
  turns off for the model off; denormal floats flushed to zero (on the session's workers and, for
  the run, the calling thread); both, as the target runs them. The calls of the four alternate,
  the order turned around every round, ms; the outputs of each are compared with the defaults' (a
  quantized model's differ where a float difference of the last bit moves an activation across a
  rounding boundary).

    python benchmarks/experiments/ort_session_settings.py [--calls 20] [--no-lm] [--markdown docs/results/ort_session_settings_xeon_amx.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_page import write_page  # noqa: E402

THREADS = 2
SHAPES = [(1, 1, 576), (1, 32, 384), (1, 256, 576), (8, 128, 384)]


def _median_us(f, calls: int) -> float:
    for _ in range(5):
        f()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def kernel_rows(calls: int) -> list:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler.runtimes.ort_session import inference_session, session_options

    vi = helper.make_tensor_value_info
    rows = []
    for norm in ("LayerNormalization", "RMSNormalization"):
        for shape in SHAPES:
            for sum_out in (False, True):
                c = shape[-1]
                inputs = ["s", "g", "b"] if norm == "LayerNormalization" else ["s", "g"]
                nodes = [helper.make_node("Add", ["x", "r"], ["s"]), helper.make_node(norm, inputs, ["y"], epsilon=1e-5, axis=-1)]
                outputs = [vi("y", TensorProto.FLOAT, list(shape))] + ([vi("s", TensorProto.FLOAT, list(shape))] if sum_out else [])
                inits = [numpy_helper.from_array(np.ones(c, np.float32), n) for n in inputs[1:]]
                graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, list(shape)), vi("r", TensorProto.FLOAT, list(shape))],
                                          outputs, inits)
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]).SerializeToString()
                feeds = {n: np.random.default_rng(0).standard_normal(shape).astype(np.float32) for n in ("x", "r")}
                timed = {}
                for label, disabled in (("on", []), ("off", ["SkipLayerNormFusion"])):
                    with tempfile.TemporaryDirectory() as d:
                        so = session_options(THREADS)
                        so.optimized_model_filepath = os.path.join(d, "o.onnx")
                        s = inference_session(model, so, disabled=disabled)
                        fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type.startswith("Skip")]
                    timed[label] = (_median_us(lambda: s.run(None, feeds), calls), fused)
                (on, fused), (off, _) = timed["on"], timed["off"]
                rows.append(f"| {norm} | {'x'.join(map(str, shape))} | {'yes' if sum_out else 'no'} | "
                            f"{', '.join(fused) or 'none'} | {on:.1f} | {off:.1f} | {on / off:.2f} |")
                print(rows[-1], file=sys.stderr)
    return rows


def _sessions(fn):
    from qcompiler.api.backend import compiled_graphs

    return [g for g in compiled_graphs(fn) if g.running_target == "ort"]


VARIANTS = {  # label: (optimizers to run without: None = the rule's, flush denormals)
    "ORT defaults": ([], False),
    "slow fusions off": (None, False),
    "denormals flushed": ([], True),
    "both (the ort target)": (None, True),
}


def _remade(session, disabled, flush):
    from qcompiler.runtimes.ort_session import OrtSession

    return OrtSession(session._source, threads=THREADS, disabled=disabled, flush_denormals=flush,
                      parameters=[session.input_names.index(n) for n in session.parameter_names])


def _largest_difference(outputs: dict) -> str:
    """The largest absolute difference of each other variant's output (logits, last hidden state)
    from the defaults', in ``VARIANTS`` order ("0": bit for bit)."""

    def first(out):
        return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out

    base = first(outputs["ORT defaults"])
    found = [float((first(outputs[k]) - base).abs().max()) for k in list(VARIANTS)[1:]]
    return " / ".join(f"{d:.1e}" if d else "0" for d in found)


def model_rows(calls: int, lm: bool) -> list:
    import torch

    import qcompiler
    from qcompiler.bundled import zoo

    torch.set_num_threads(THREADS)
    cases = []
    mini, mtok = zoo.load_minilm()
    calib_s, held = zoo.wiki_sentences(32, 16)
    enc = lambda s, n: dict(mtok(s, padding="max_length", truncation=True, max_length=n, return_tensors="pt"))
    qcompiler.calibrate(mini, [enc(calib_s[i:i + 8], 128) for i in range(0, 32, 8)], progress=False)
    for shape, batch in (("8x128", enc(held[:8], 128)), ("1x32", enc(held[8:9], 32))):
        for label, options in (("fp32", {"recipe": "w8a8", "skip": ["*"]}), ("w8a8", {"recipe": "w8a8"}),
                               ("w8a16", {"recipe": "w8a16"})):
            fn = torch.compile(mini, backend="qcompile", options={**options, "target": "ort", "min_sqnr_db": 20 + len(cases) / 100})
            cases.append((f"MiniLM {shape}", label, fn, lambda f=fn, b=batch: f(**b)))
    if lm:
        model, tok = zoo.load_smollm2()
        ids = zoo.wiki_token_ids(tok, "smollm2")
        _, held_w = zoo.lm_windows(ids, 256, 1, 2)
        with torch.no_grad():
            past = model(input_ids=held_w[:1], use_cache=True).past_key_values
        nxt = held_w[1:2, :1]

        def step(f):
            out = f(input_ids=nxt, past_key_values=past, use_cache=True)
            past.crop(-1)
            return out

        for label, recipe in (("fp32", None), ("w8a8-blocks", "w8a8-blocks")):
            options = {"recipe": recipe or "w8a8", **({} if recipe else {"skip": ["*"]}), "target": "ort",
                       "min_sqnr_db": 20 + len(cases) / 100}
            fn = torch.compile(model, backend="qcompile", options=options)
            cases.append(("SmolLM2 decode (cache 256)", label, fn, lambda f=fn: step(f)))
            fn = torch.compile(model, backend="qcompile", options={**options, "min_sqnr_db": options["min_sqnr_db"] + 0.005})
            cases.append(("SmolLM2 prefill 256", label, fn, lambda f=fn: f(input_ids=held_w[:1], use_cache=False)))
    rows = []
    with torch.no_grad():
        for workload, label, fn, call in cases:
            call()
            graphs = _sessions(fn)
            variants = {k: [_remade(g.fn.session, d, f) for g in graphs] for k, (d, f) in VARIANTS.items()}
            turned_off = sorted({o for s in variants["slow fusions off"] for o in s.disabled_optimizers}) or ["none"]
            times, outputs = {k: [] for k in variants}, {}
            for round_ in range(calls):
                for k in (list(variants) if round_ % 2 else list(variants)[::-1]):
                    for g, s in zip(graphs, variants[k]):
                        g.fn.session = s
                    outputs[k] = call()
                    t = time.perf_counter()
                    call()
                    times[k].append(time.perf_counter() - t)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            base = ms["ORT defaults"]
            cells = " | ".join(f"{ms[k]:.2f} ({base / ms[k]:.2f}x)" for k in VARIANTS)
            rows.append(f"| {workload} | {label} | {', '.join(turned_off)} | {cells} | {_largest_difference(outputs)} |")
            print(rows[-1], file=sys.stderr)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--no-lm", action="store_true", help="MiniLM only")
    p.add_argument("--markdown", help="write the tables to this results page")
    args = p.parse_args(argv)
    kernels = kernel_rows(args.calls * 10)
    models = model_rows(args.calls, not args.no_lm)
    body = "\n".join([
        "\n\n".join(__doc__.split("\n\n")[1:3]).strip(), "",
        f"{THREADS} threads.", "",
        "| norm | B x S x C | sum an output | fused op with the rewrite on | rewrite on us | rewrite off us | on / off |",
        "|---|---|---|---|---|---|---|", *kernels, "",
        "| workload | model | rewrites the rule turns off | " + " | ".join(f"{k} ms" for k in VARIANTS)
        + " | largest output difference from the defaults (" + " / ".join(list(VARIANTS)[1:]) + ") |",
        "|---|---|---|" + "---|" * len(VARIANTS) + "---|", *models, ""])
    print(body)
    if args.markdown:
        write_page(args.markdown, "The ort target's session settings against ONNX Runtime's defaults", body)


if __name__ == "__main__":
    main()
