"""When the ``ort`` target's ONNX Runtime workers busy-wait: SmolLM2-135M and MiniLM through the
``ort`` target with the workers spinning always (ONNX Runtime's default), only during a run
(``allow_spinning=1`` with ``force_spinning_stop=1``: what ``runtimes/ort_session.py`` sets), and
never (``allow_spinning=0``).

Each setting runs in a fresh process (session options are fixed when a session is made), with
these measurements, medians:

* decode step: one token on a KV cache of 256 (eager FP32, FP32 and ``w8a8`` through ``ort``),
  each configuration's calls back to back and one call of each in turn (as cpu_speed.py times
  them), ms;
* ``generate()``: SmolLM2 ``w8a8`` (``model.forward = torch.compile(..., dynamic=True)`` as the
  README says), 64 new tokens after a 61-token prompt, tokens/s (prefill included);
* MiniLM 8 x 128 ``w8a8`` through ``ort``, one call after an eager FP32 call (torch's threads just
  used), ms.

    python benchmarks/experiments/ort_spinning.py [--calls 15] [--threads 2] [--markdown docs/results/ort_spinning.md]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_page import write_page  # noqa: E402

CONFIGS = {"eager fp32": None,
           "ort fp32": {"recipe": "w8a8", "skip": ["*"], "target": "ort"},
           "ort w8a8": {"recipe": "w8a8", "target": "ort"}}
SETTINGS = {  # label: session config entries
    "always (ONNX Runtime's default)": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "0"},
    "during a run only (the ort target)": {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"},
    "never": {"session.intra_op.allow_spinning": "0", "session.force_spinning_stop": "0"},
}


def _median_ms(f, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def child(setting: str, calls: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)

    import qcompiler
    from qcompiler.bundled import zoo
    from qcompiler.runtimes import ort_session

    made = ort_session.session_options

    def with_setting(n=None):
        so = made(n)
        for key, value in SETTINGS[setting].items():
            so.add_session_config_entry(key, value)
        return so

    ort_session.session_options = with_setting
    out = {}
    lm, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib, held = zoo.lm_windows(ids, 256, 2, 2)
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

    with torch.no_grad():
        for f in fns.values():
            step(f)
        back_to_back = {k: [step(f) for _ in range(calls)] for k, f in fns.items()}
        in_turn = {k: [] for k in fns}
        for _ in range(calls):
            for k, f in fns.items():
                in_turn[k].append(step(f))
    for k in fns:
        out[f"decode step, {k}: back to back ms"] = statistics.median(back_to_back[k]) * 1e3
        out[f"decode step, {k}: in turn ms"] = statistics.median(in_turn[k]) * 1e3

    gen_lm, _ = zoo.load_smollm2()
    gen_lm.forward = torch.compile(gen_lm.forward, backend="qcompile", options={"recipe": "w8a8"}, dynamic=True)
    prompt = ids[:61].unsqueeze(0)

    def generate():
        gen_lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64,
                        min_new_tokens=64, do_sample=False)

    with torch.no_grad():
        generate()
        out["generate() w8a8: tokens/s"] = 64 / (_median_ms(generate, max(3, calls // 3)) / 1e3)

    enc, etok = zoo.load_minilm()
    _, sentences = zoo.wiki_sentences(0, 8)
    batch = dict(etok(sentences, padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    compiled = torch.compile(enc, backend="qcompile", options={"recipe": "w8a8", "target": "ort"})
    times = []
    with torch.no_grad():
        compiled(**batch)
        for _ in range(calls):
            enc(**batch)  # torch's threads busy just before
            t = time.perf_counter()
            compiled(**batch)
            times.append(time.perf_counter() - t)
    out["MiniLM 8x128 w8a8 after an eager call: ms"] = statistics.median(times) * 1e3
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=15)
    p.add_argument("--threads", type=int, default=2, help="torch's and ONNX Runtime's threads per process")
    p.add_argument("--markdown", help="write the table to this results page")
    p.add_argument("--child", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.calls, args.threads)))
        return
    results = {}
    for setting in SETTINGS:
        run = subprocess.run([sys.executable, __file__, "--child", setting, "--calls", str(args.calls),
                              "--threads", str(args.threads)], capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if run.returncode:
            raise SystemExit(f"the '{setting}' process failed:\n{run.stderr[-3000:]}")
        results[setting] = json.loads(run.stdout.strip().splitlines()[-1])
        print(setting, results[setting], flush=True)
    measures = list(next(iter(results.values())))
    lines = ["| measurement | " + " | ".join(f"workers spin {s}" for s in SETTINGS) + " |",
             "|---|" + "---|" * len(SETTINGS)]
    for m in measures:
        lines.append(f"| {m} | " + " | ".join(f"{results[s][m]:.1f}" for s in SETTINGS) + " |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        doc = __doc__.split("\n\n    python")[0]
        write_page(args.markdown, "ONNX Runtime's worker spinning and the ort target",
                   doc + f"\n\n{args.calls} calls per median, {args.threads} threads per process.\n\n" + table)


if __name__ == "__main__":
    main()
