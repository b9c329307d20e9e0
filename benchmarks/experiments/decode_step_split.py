"""Where one SmolLM2-135M decode step of ``generate()`` goes through the ``ort`` target, layer by layer.

``model.forward = torch.compile(model.forward, backend="qcompile", options={"recipe": ...},
dynamic=True)`` as the README says, then greedy ``generate()`` of 65 tokens after a 61-token
prompt, less a 1-token ``generate()`` of the same prompt (its prefill and first token): what is
left is 64 decode steps, each split by timers wrapped around the layers it passes through, from the
inside out:

* ONNX Runtime's run (``run_with_ortvaluevector``, or ``run_with_iobinding`` where that is missing);
* qcompile's session wrapper (``runtimes.ort_session.OrtSession``: wrapping the inputs, outputs to
  torch tensors, the denormal mode around the run);
* qcompile's compiled graph (``lowering.ort.OrtGraph`` and ``api.backend.CompiledGraph``: the
  checks that the parameters are the compiled ones and unchanged);
* Dynamo's compiled frame (its guards, the arguments it gathers, the cache's side effects);
* transformers' ``generate()`` loop around the forward (the rest of the step).

Each layer's column is what it adds to the one inside it; median of ``--repeats`` rounds.
``--dynamo`` adds rows with two Dynamo settings a user may choose, neither qcompile's default:
``specialize_float`` (``torch._dynamo.config.specialize_float = True``: a module's float attributes
stay guarded constants instead of tensors made at every call), ``guard_filter`` (``options=
{"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}``: no guards on the
modules' attributes and parameters) and ``both``.

    python benchmarks/experiments/decode_step_split.py [--recipes w8a8-blocks w8a8 ...] [--dynamo default both ...]
        [--repeats 5] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_page import write_page  # noqa: E402

PROMPT, NEW = 61, 64
LAYERS = ["run", "session", "graph", "dynamo", "step"]  # inside out; "step": the whole decode step
NAMES = {"run": "ONNX Runtime run", "session": "session wrapper", "graph": "compiled graph checks",
         "dynamo": "Dynamo frame", "step": "generate() loop"}


def timed(totals: dict, key: str, fn):
    """``fn``, adding the seconds of each call to ``totals[key]``."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t
    return wrapper


DYNAMO = ("default", "specialize_float", "guard_filter", "both")


def split(recipe: str, repeats: int, threads: int, dynamo: str = "default") -> dict:
    """Milliseconds per decode step that each layer adds (median of ``repeats`` rounds)."""
    import torch

    from qcompiler.api import backend
    from qcompiler.bundled import zoo
    from qcompiler.runtimes import ort_session

    torch.set_num_threads(threads)
    totals = collections.Counter()
    patches = [(ort_session.BatchedRun, "run", "run"), (ort_session.DirectBinding, "run", "run"),
               (ort_session.PublicBinding, "run", "run"),
               (ort_session.OrtSession, "__call__", "session"),
               (backend.CompiledGraph, "__call__", "graph")]
    for cls, name, key in patches:
        setattr(cls, name, timed(totals, key, getattr(cls, name)))
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    _, held = zoo.lm_windows(ids, 256, 4, 4)
    prompt = held[-1][:PROMPT].unsqueeze(0)
    options = {"recipe": recipe}
    if dynamo in ("specialize_float", "both"):
        torch._dynamo.config.specialize_float = True
    if dynamo in ("guard_filter", "both"):
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    compiled = torch.compile(model.forward, backend="qcompile", options=options, dynamic=True)
    model.forward = timed(totals, "dynamo", compiled)

    def generate(new: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False)
        return time.perf_counter() - t

    generate(4)  # compiles the prompt and the decode graphs
    rounds = []
    for _ in range(repeats):
        totals.clear()
        first = generate(1)
        once = dict(totals)
        totals.clear()
        whole = generate(NEW + 1)
        step = {k: (totals[k] - once.get(k, 0.0)) / NEW * 1e3 for k in ("run", "session", "graph", "dynamo")}
        step["step"] = (whole - first) / NEW * 1e3
        rounds.append(step)
    med = {k: statistics.median(r[k] for r in rounds) for k in LAYERS}
    added = {LAYERS[0]: med[LAYERS[0]]}
    for inner, outer in zip(LAYERS, LAYERS[1:]):
        added[outer] = med[outer] - med[inner]
    return {"step_ms": med["step"], "added": added}


def _child(recipe: str, repeats: int, threads: int, dynamo: str) -> dict:
    import json
    import subprocess

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", recipe, "--repeats", str(repeats),
                          "--threads", str(threads), "--dynamo", dynamo], capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if l.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{recipe}: {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["w8a8-blocks", "w8a8"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dynamo", nargs="+", default=["default"], choices=DYNAMO)
    p.add_argument("--markdown")
    p.add_argument("--child")
    args = p.parse_args(argv)
    if args.child:
        import json

        print(json.dumps(split(args.child, args.repeats, args.threads, args.dynamo[0])))
        return
    rows = []
    for recipe in args.recipes:  # each in a process of its own
        for dynamo in args.dynamo:
            r = _child(recipe, args.repeats, args.threads, dynamo)
            cells = " | ".join(f"{r['added'][k]:.2f}" for k in LAYERS)
            rows.append(f"| {recipe} | {dynamo} | {r['step_ms']:.2f} | {cells} |")
            print(rows[-1], flush=True)
    header = "| recipe | Dynamo setting | decode step ms | " + " | ".join(f"{NAMES[k]} ms" for k in LAYERS) + " |"
    table = "\n".join([header, "|" + "---|" * (len(LAYERS) + 3), *rows])
    body = (__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip() + f"\n\n{args.threads} threads, median of "
            f"{args.repeats} rounds, each row in a process of its own.\n\n" + table)
    if args.markdown:
        write_page(args.markdown, "One decode step of generate() through the ort target, layer by layer", body)


if __name__ == "__main__":
    main()
