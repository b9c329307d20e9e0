"""Why the ``ort`` target's sessions do not busy-wait: SmolLM2-135M one-token decode (KV 256)
with ONNX Runtime's worker spinning on (its default) and off (``runtimes/ort_session.py``).

Each setting runs in a fresh process (session options are fixed when a session is made), with
three configurations: eager FP32, FP32 through the ``ort`` target, ``w8a8`` through the ``ort``
target. Timed two ways: each configuration's calls back to back, and one call of each in turn
(as cpu_speed.py times them), medians in ms.

    python benchmarks/experiments/ort_spinning.py [--calls 15]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CONFIGS = {"eager fp32": None,
           "ort fp32": {"recipe": "w8a8", "skip": ["*"], "target": "ort"},
           "ort w8a8": {"recipe": "w8a8", "target": "ort"}}


def child(spin: str, calls: int) -> dict:
    import torch

    import qcompiler
    from qcompiler.bundled import zoo
    from qcompiler.runtimes import ort_session

    made = ort_session.session_options

    def with_spinning(threads=None):
        so = made(threads)
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        return so

    ort_session.session_options = with_spinning
    lm, tok = zoo.load_smollm2()
    calib, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 256, 2, 2)
    qcompiler.calibrate(lm, [{"input_ids": w[None]} for w in calib], progress=False)
    with torch.no_grad():
        past = lm(input_ids=held[:1], use_cache=True).past_key_values
    nxt = held[1:2, :1]
    fns = {k: lm if o is None else torch.compile(lm, backend="qcompile", options=o) for k, o in CONFIGS.items()}

    def step(f):  # the same cache contents every call: drop the token each step appends
        t = time.perf_counter()
        f(input_ids=nxt, past_key_values=past, use_cache=True).logits.argmax(-1)
        past.crop(-1)
        return time.perf_counter() - t

    out = {}
    with torch.no_grad():
        for f in fns.values():
            step(f)
        back_to_back = {k: [step(f) for _ in range(calls)] for k, f in fns.items()}
        in_turn = {k: [] for k in fns}
        for _ in range(calls):
            for k, f in fns.items():
                in_turn[k].append(step(f))
    for k in fns:
        out[k] = (statistics.median(back_to_back[k]) * 1e3, statistics.median(in_turn[k]) * 1e3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.calls)))
        return
    print(f"{'spinning':10} {'configuration':12} {'back to back ms':>16} {'in turn ms':>11}")
    for spin, label in (("1", "on (ORT)"), ("0", "off (ours)")):
        run = subprocess.run([sys.executable, __file__, "--child", spin, "--calls", str(args.calls)],
                             capture_output=True, text=True, check=True)
        for name, (b2b, turn) in json.loads(run.stdout.strip().splitlines()[-1]).items():
            print(f"{label:10} {name:12} {b2b:16.1f} {turn:11.1f}", flush=True)


if __name__ == "__main__":
    main()
