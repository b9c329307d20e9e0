"""CPU speed of the ONNX Runtime path against every alternative we can run here, side by side.

Rows: all-MiniLM-L6-v2 (batch 8 x 128, batch 1 x 32) and SmolLM2-135M (prefill of 256
tokens; one decode step with a 256-token KV cache), each as
  eager FP32 | torch.compile FP32 | ORT FP32 (the same graph exported, nothing quantized)
  | ORT quantize_dynamic (the peer: onnxruntime.quantization.quantize_dynamic, per-channel INT8,
    applied to that FP32 ONNX graph, run in the ort target's session settings; once more in ONNX
    Runtime's default session, as its users run it; once with reduce_range=True, ORT's advice for
    AVX2 CPUs whose u8 x s8 kernels saturate) | qcompile w8a8 / inductor (the other CPU target, for
    ``target="auto"``) | qcompile w8a8 / ort | qcompile w8a8-smoothquant / ort
  | qcompile w8a16 / ort | SmolLM2 only: qcompile w8a8 with the tied lm_head quantized, and
    w8a8-blocks (activations per block of 32 channels) / ort
with the ONNX model size and the accuracy of each against eager FP32 (MiniLM: mean and least
cosine of sentence embeddings over held-out sentences; SmolLM2: perplexity on held-out windows).
The ORT rows run through ``torch.compile(..., backend="qcompile", options={"target": "ort"})``;
the peer replaces each of those sessions by its ``quantize_dynamic`` version of the FP32 graph,
so every ORT row runs exactly the same graph. Timing is interleaved round-robin (median of the
rounds; each timed call preceded by ``--settle`` untimed calls of the same row and ``--pause``
seconds idle): this machine is noisy, read the ratios.

    python benchmarks/cpu_speed.py [--rounds 7] [--quick] [--workload REGEX] [--settle 1] [--pause 0.05] [--reverse]
                                   [--markdown docs/results/cpu_speed.md]

How to read it: 'vs eager' is eager FP32's median time over this row's (above 1 is faster); 'first s'
the first call including compilation (and, for the ORT rows, export and session creation), with
cold compile caches (the run gets an empty ``$QCOMPILE_CACHE`` and ``$TORCHINDUCTOR_CACHE_DIR``; the
libraries are imported already);
accuracy is against eager FP32 on held-out data, so a fast row with a large perplexity change is
not a win.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from qcompiler.api.backend import compiled_graphs
from qcompiler.bundled import zoo
import qcompiler

CONFIGS = [  # label, backend, options
    ("eager fp32", None, None),
    ("torch.compile fp32", "inductor", None),
    ("ORT fp32", "qcompile", {"recipe": "w8a8", "skip": ["*"], "target": "ort"}),
    # min_sqnr_db differs from the row above only so that Dynamo does not reuse that row's graphs
    ("ORT quantize_dynamic (peer)", "qcompile", {"recipe": "w8a8", "skip": ["*"], "target": "ort",
                                                 "min_sqnr_db": 0.5, "_peer": {}}),
    # the same file in ONNX Runtime's default session (every graph rewrite on, denormals kept), as a
    # quantize_dynamic user runs it; the row above runs in the ort target's session settings
    ("ORT quantize_dynamic (peer), ORT's default session", "qcompile", {"recipe": "w8a8", "skip": ["*"], "target": "ort",
                                                                        "min_sqnr_db": 0.55, "_peer": {"_ort_defaults": True}}),
    # ORT's documented remedy for its u8 x s8 kernels saturating on AVX2 without VNNI: 7-bit weights
    ("ORT quantize_dynamic reduce_range", "qcompile", {"recipe": "w8a8", "skip": ["*"], "target": "ort",
                                                       "min_sqnr_db": 0.6, "_peer": {"reduce_range": True}}),
    ("qcompile w8a8 / inductor", "qcompile", {"recipe": "w8a8", "target": "inductor"}),
    ("qcompile w8a8 / ort", "qcompile", {"recipe": "w8a8", "target": "ort"}),
    ("qcompile w8a8-smoothquant / ort", "qcompile", {"recipe": "w8a8-smoothquant", "target": "ort"}),
    ("qcompile w8a16 / ort", "qcompile", {"recipe": "w8a16", "target": "ort"}),
    # the tied lm_head too, as the peer does (MiniLM has no tied linear: LM rows only)
    ("qcompile w8a8 quantize_tied / ort", "qcompile", {"recipe": "w8a8", "quantize_tied": True, "target": "ort",
                                                        "_workloads": "SmolLM2"}),
    # activations per block of 32 channels (MatMulNBits), the tied lm_head too
    ("qcompile w8a8-blocks / ort", "qcompile", {"recipe": "w8a8-blocks", "target": "ort", "_workloads": "SmolLM2"}),
]


def peer_quantize(src: str, dst: str, **quantize_options):
    """ORT's own quantize_dynamic (per-channel INT8) of the FP32 ONNX file ``src`` into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # its default op list includes 'Attention' meaning ORT's contrib op, and it rewrites opset 23's
    # Attention into an invalid QAttention: quantize the MatMuls, as it does by default
    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     **quantize_options)


def peer_session(session, **quantize_options):
    """The same graph's FP32 ONNX model through ``peer_quantize`` (``PeerSession``)."""
    return PeerSession(session, **quantize_options)


class PeerSession:
    """A qcompile session's FP32 graph quantized by ``peer_quantize``, made at its first call: the
    model parameters the session takes as inputs (``OrtSession.parameter_names``, bound to the
    model's memory) become constants of the peer's file, since ``quantize_dynamic`` quantizes the
    MatMuls of constant weights only. Called as the session is: with every input."""

    def __init__(self, session, _ort_defaults: bool = False, **quantize_options):
        self.source, self.options, self.inner = session, quantize_options, None
        # ONNX Runtime's default session (no rewrite turned off, denormals kept) instead of the ort target's
        self.session_settings = {"disabled": [], "flush_denormals": False} if _ort_defaults else {}
        self.input_names = session.input_names

    def _build(self, tensors) -> None:
        import onnx
        from onnx import numpy_helper

        from qcompiler.runtimes.ort_session import OrtSession

        model = self.source.model
        baked = set(self.source.parameter_names)
        values = {n: t for n, t in zip(self.input_names, tensors) if n in baked}
        kept = [i for i in model.graph.input if i.name not in baked]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        arrays = {n: v.detach().float().numpy() for n, v in values.items()}
        # a weight the graph reads through a Transpose (ONNX Runtime fuses it into its MatMul) is
        # baked transposed, so that quantize_dynamic finds a MatMul of a constant weight
        for node in [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in arrays]:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arrays[node.output[0]] = np.ascontiguousarray(np.transpose(arrays[node.input[0]], perm))
            model.graph.node.remove(node)
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items() if n in used)
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
            onnx.save(model, src, save_as_external_data=True, location="fp32.onnx.data")
            peer_quantize(src, dst, use_external_data_format=True, **self.options)
            quantized = onnx.load(dst)
        floats = [n.name for n in quantized.graph.node if n.op_type == "MatMul" and n.input[1] in arrays]
        if floats or not any(n.op_type == "MatMulInteger" for n in quantized.graph.node):
            raise RuntimeError(f"quantize_dynamic left the MatMuls {floats[:3]} of constant weights in float: "
                               f"the peer would not be the peer")
        self.inner = OrtSession(quantized, **self.session_settings)
        self.baked = baked

    @property
    def model(self):
        """The peer's quantized file (after the first call)."""
        return self.inner.model

    def __call__(self, *tensors):
        if self.inner is None:
            self._build(tensors)
        return self.inner(*[t for n, t in zip(self.input_names, tensors) if n not in self.baked])


def ort_graphs(fn):
    """The ONNX Runtime graphs of a compiled row (none for the eager model: ``compiled_graphs`` of a
    plain module would describe its most recent compile, another row's)."""
    if not hasattr(fn, "_orig_mod"):
        return []
    return [g for g in compiled_graphs(fn) if g.running_target == "ort"]


def workloads(quick: bool, pattern: str):
    mini, mtok = zoo.load_minilm()
    sents = zoo.wiki_sentences(64, 64)
    calib_s, held = sents
    enc = lambda s, n: dict(mtok(s, padding="max_length", truncation=True, max_length=n, return_tensors="pt"))
    b8, b1 = enc(held[:8], 128), enc(held[8:9], 32)
    mini_eval = [enc(held[i:i + 8], 128) for i in range(16, 64, 8)]

    def cosine(fn):
        ref = torch.cat([zoo.sentence_embeddings(mini, b) for b in mini_eval])
        out = torch.cat([zoo.sentence_embeddings(fn, b) for b in mini_eval])
        c = torch.nn.functional.cosine_similarity(out, ref)
        return f"cos {c.mean():.4f} (min {c.min():.4f})"

    out = {
        "MiniLM 8x128": (mini, lambda f: (lambda: f(**b8)), [enc(calib_s[i:i + 8], 128) for i in range(0, 32, 8)], cosine),
        "MiniLM 1x32": (mini, lambda f: (lambda: f(**b1)), [enc(calib_s[i:i + 1], 32) for i in range(8)], None),
    }
    if not quick:
        lm, tok = zoo.load_smollm2()
        ids = zoo.wiki_token_ids(tok, "smollm2")
        calib_w, held_w = zoo.lm_windows(ids, 256, 4, 4)
        prompt = held_w[:1]
        with torch.no_grad():
            past = lm(input_ids=prompt, use_cache=True).past_key_values
        nxt = held_w[1:2, :1]

        def decode(f):
            def step():  # the same cache contents every call: drop the token each step appends
                f(input_ids=nxt, past_key_values=past, use_cache=True)
                past.crop(-1)
            return step

        with torch.no_grad():
            base = zoo.perplexity(lm, held_w)

        def ppl(fn):
            value = zoo.perplexity(fn, held_w)
            return f"ppl {value:.3f} ({100 * (value / base - 1):+.4f}%)"

        calib = [{"input_ids": w[None]} for w in calib_w]
        out["SmolLM2 prefill 256"] = (lm, lambda f: (lambda: f(input_ids=prompt, use_cache=False)), calib, ppl)
        out["SmolLM2 decode 1 (KV 256)"] = (lm, decode, calib, None)
    return {k: v for k, v in out.items() if re.search(pattern, k)}


def build(model, backend, options):
    if backend is None:
        return model
    if options is None:
        return torch.compile(model, backend=backend)
    options = {k: v for k, v in options.items() if not k.startswith("_")}
    return torch.compile(model, backend=backend, options=options)


def onnx_bytes(graphs) -> str:
    sizes = [g.fn.session.model.ByteSize() for g in graphs if getattr(g.fn, "session", None) is not None]
    return f"{sum(sizes) / 2**20:7.1f}" if sizes else "      -"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="MiniLM only")
    p.add_argument("--workload", default=".", help="regex over workload names")
    p.add_argument("--settle", type=int, default=1, help="untimed calls of a row before each timed one")
    p.add_argument("--pause", type=float, default=0.05, help="seconds idle before each timed call")
    p.add_argument("--reverse", action="store_true",
                   help="time the rows after eager in reverse order (does a row's place in the rotation matter?)")
    p.add_argument("--markdown", help="also write the table as a stamped results page (docs/results/...)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cold_caches import cold_cache_env

    cold = tempfile.TemporaryDirectory(prefix="qcompile-cpu-speed-")  # removed when main returns
    os.environ.update(cold_cache_env(cold.name, "cpu_speed"))
    rows = []
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    print(f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}", file=sys.stderr)
    print(f"{'workload':26} {'configuration':34} {'median ms':>10} {'vs eager':>9} {'ONNX MiB':>9} "
          f"{'first s':>8}  accuracy vs FP32")
    for wname, (model, make_call, calib, accuracy) in workloads(args.quick, args.workload).items():
        qcompiler.calibrate(model, calib, progress=False)
        calls = {}
        configs = CONFIGS[:1] + (CONFIGS[:0:-1] if args.reverse else CONFIGS[1:])
        for label, backend, options in configs:
            if options and not re.search(options.get("_workloads", "."), wname):
                continue
            fn = build(model, backend, options)
            call = make_call(fn)
            with torch.no_grad():
                t = time.perf_counter()
                call()
                graphs = ort_graphs(fn)
                if options and "_peer" in options:
                    for g in graphs:  # a graph that fell back to Inductor has no session to replace
                        if g.fn.session is not None:
                            g.fn.session = peer_session(g.fn.session, **options["_peer"])
                call()
                warm = time.perf_counter() - t
            calls[label] = (call, warm, fn, graphs)
        times = {label: [] for label in calls}
        with torch.no_grad():
            for _ in range(args.rounds):
                for label, (call, *_rest) in calls.items():
                    # a row timed right after a torch row ran up to 30% slower at MiniLM 1x32
                    # (--reverse moves the penalty with the order): torch's OpenMP workers keep
                    # spinning after a parallel region. An untimed call and a pause before each
                    # timed call let every row start from the same idle threads
                    for _ in range(args.settle):
                        call()
                    time.sleep(args.pause)
                    t = time.perf_counter()
                    call()
                    times[label].append(time.perf_counter() - t)
        eager = statistics.median(times["eager fp32"])
        for label, v in times.items():
            t = statistics.median(v)
            _call, warm, fn, graphs = calls[label]
            acc = ""
            if accuracy is not None and label != "eager fp32":
                with torch.no_grad():
                    acc = accuracy(fn)
            print(f"{wname:26} {label:34} {1e3 * t:10.2f} {eager / t:8.2f}x {onnx_bytes(graphs):>9} {warm:8.1f}  {acc}",
                  flush=True)
            rows.append((wname, label, f"{1e3 * t:.2f}", f"{eager / t:.2f}x", onnx_bytes(graphs).strip(),
                         f"{warm:.1f}", acc))
        # drop this workload's sessions and graphs before the next one: holding every row of
        # every workload at once went past this machine's 23 GB (killed in the decode rows)
        calls.clear()
        torch._dynamo.reset()
        gc.collect()
    legend = ("'vs eager': eager FP32 time / this time, >1 is faster; medians of interleaved rounds; "
              "ONNX MiB: the serialized models the ORT rows run, without the float parameters a qcompile "
              "session reads in place from the model (the peer's file holds them); the peer rows run in the "
              "ort target's session settings (slow rewrites off, denormals flushed) but the one in ONNX Runtime's default session")
    print(f"({legend})")
    if args.markdown:
        from results_page import write_page

        header = ("workload", "configuration", "median ms", "vs eager", "ONNX MiB", "first s", "accuracy vs FP32")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        cpu = f"threads={torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}"
        write_page(args.markdown, "CPU speed: qcompile's targets against eager, Inductor and ONNX Runtime's quantizer",
                   "\n".join(lines) + f"\n\n{legend}; {cpu}; {args.rounds} rounds.\n")


if __name__ == "__main__":
    main()
