"""CPU latency of the qcompile targets against eager FP32 and torch.compile FP32, side by side.

Rows: all-MiniLM-L6-v2 (batch 8 x 128 and 1 x 32) and SmolLM2-135M (256-token prefill, and one
decode step with a 256-token KV cache). Each configuration is timed interleaved with the others
(round-robin, median of the rounds), because this machine is noisy: read the ratios, not the
absolute times. This is what ``lowering.AUTO`` (the default target) is chosen from.

    python benchmarks/cpu_latency.py [--rounds 7] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from qcompiler.bundled import zoo
import qcompiler

CONFIGS = [  # label, backend, options
    ("eager fp32", None, None),
    ("torch.compile fp32", "inductor", None),
    ("qcompile w8a8 / reference", "qcompile", {"recipe": "w8a8", "target": "reference"}),
    ("qcompile w8a8 / inductor", "qcompile", {"recipe": "w8a8", "target": "inductor"}),
    ("qcompile w8a16 / inductor", "qcompile", {"recipe": "w8a16", "target": "inductor"}),
    ("qcompile w8a8-smoothquant / inductor", "qcompile",
     {"recipe": "w8a8-smoothquant", "alpha": "auto", "target": "inductor"}),
]


def workloads(quick: bool):
    """name -> (model, make_call): make_call(fn) returns a zero-argument callable to time."""
    mini, mtok = zoo.load_minilm()
    sents = zoo.wiki_sentences(0, 64)[1]
    b8 = dict(mtok(sents[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    b1 = dict(mtok(sents[8:9], padding="max_length", truncation=True, max_length=32, return_tensors="pt"))
    out = {
        "MiniLM 8x128": (mini, lambda f: (lambda: f(**b8)), [b8]),
        "MiniLM 1x32": (mini, lambda f: (lambda: f(**b1)), [b1]),
    }
    if quick:
        return out
    lm, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    prompt = ids[None, :256]
    with torch.no_grad():
        past = lm(input_ids=prompt, use_cache=True).past_key_values
    nxt = ids[None, 256:257]

    def decode(f):
        # the same cache contents every call: drop the token each step appends
        def step():
            f(input_ids=nxt, past_key_values=past, use_cache=True)
            past.crop(-1)
        return step

    out["SmolLM2 prefill 256"] = (lm, lambda f: (lambda: f(input_ids=prompt, use_cache=False)),
                                  [{"input_ids": ids[None, 1000 + 256 * i: 1256 + 256 * i]} for i in range(4)])
    out["SmolLM2 decode 1 (KV 256)"] = (lm, decode, [{"input_ids": ids[None, 2000 + 256 * i: 2256 + 256 * i]}
                                                     for i in range(4)])
    return out


def build(model, backend, options):
    # no dynamo reset between configurations: each keeps its own compiled graphs (Dynamo guards
    # on the backend), so every configuration is timed in the same interleaved rounds
    if backend is None:
        return model
    return torch.compile(model, backend=backend, options=options) if options else torch.compile(model, backend=backend)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="MiniLM only")
    args = p.parse_args(argv)
    # configurations x shapes compile many graphs for the same forward: allow them all
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    print(f"threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}", file=sys.stderr)
    print(f"{'workload':26} {'configuration':40} {'median ms':>10} {'vs eager':>9} {'first calls s':>14}")
    for wname, (model, make_call, calib) in workloads(args.quick).items():
        with qcompiler.calibrate(model, calib, progress=False):
            pass
        calls = {}
        for label, backend, options in CONFIGS:
            fn = build(model, backend, options)
            call = make_call(fn)
            with torch.no_grad():
                t = time.perf_counter()
                call()
                call()  # second call: any recompile for the decode-cache state happens here
                warm = time.perf_counter() - t
            calls[label] = (call, warm)
        times = {label: [] for label in calls}
        with torch.no_grad():
            for _ in range(args.rounds):
                for label, (call, _) in calls.items():
                    t = time.perf_counter()
                    call()
                    times[label].append(time.perf_counter() - t)
        # printed per workload, so a failure later keeps what was measured
        eager = statistics.median(times["eager fp32"])
        for label, v in times.items():
            t = statistics.median(v)
            print(f"{wname:26} {label:40} {1e3 * t:10.2f} {eager / t:8.2f}x {calls[label][1]:14.1f}", flush=True)
    print("('vs eager': eager FP32 time / this time, >1 is faster; medians of interleaved rounds)")


if __name__ == "__main__":
    main()
