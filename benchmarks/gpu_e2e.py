"""End to end on the GPU: a Llama-style decoder, bf16 torch.compile against each recipe on the triton target.

The model is built from a transformers ``LlamaConfig`` (hidden 4096, intermediate 11008, 32
heads: Llama-2-7B's layer, random weights, bf16) with ``--layers`` layers. Per row:
  decode  one token at a time after a ``--past``-token prompt, tokens/s. The KV cache is a
          transformers ``StaticCache`` of ``--past`` + 64 slots (the form torch.compile and CUDA
          graphs need): attention reads every slot, masked, so every step has the same shapes
          and the same work
  GPU ms  the GPU's busy time per decode step: the durations of the kernels and copies of 5 steps
          (torch.profiler), over 5. Against the wall time per step (1000 / tok/s) it shows how much
          of a step the host or launch gaps take
  prefill one ``--prefill``-token forward, milliseconds
  logits  relative error and top-1 agreement of the decode logits: bf16 rows against bf16 eager, qcompile
          rows against qcompile's reference target on the same quantized weights (a random model's
          logits against bf16 measure the quantization, which random layers amplify, not the kernels)
Rows: bf16 eager, bf16 torch.compile (Inductor) without and with mode="reduce-overhead" (CUDA
graphs), then qcompile w8a8 / w8a8-smoothquant / fp8 / w8a16 / w4a16 through ``target="triton"``
with ``cuda_graphs=True`` (``--no-graphs`` adds each recipe without them too; ``--auto`` adds each
through ``target="auto"``, which keeps triton where its linears measured faster, with what it ran). The ratio columns
divide by the best bf16 row of the same run. Decode is timed over ``--reps`` steps with one
synchronize at the end; prefill is the median of CUDA-event-timed repeats. Each qcompile row also
prints the kernels the triton target measured and chose for its linears.

    python benchmarks/gpu_e2e.py [--layers 8] [--past 512] [--prefill 2048] [--recipes w4a16,w8a16]
    TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --smoke   # CPU, a tiny config: checks the rows only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HEADROOM = 64  # cache slots after the prompt: each row decodes reps + 4 tokens into them
RECIPES = ["w8a8", "w8a8-smoothquant", "fp8", "w8a16", "w4a16"]


def build(layers: int, smoke: bool, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4,
                          num_hidden_layers=layers, vocab_size=256, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return model, cfg


def steps_timer(device):
    """ms per call of ``fn`` over ``reps`` back-to-back calls with one synchronize at the end (a
    per-call synchronize would add the host's time of every step to the GPU's)."""
    def measure(fn, reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t) / reps
    return measure


def gpu_ms_per_step(step, steps: int = 5) -> float:
    """Milliseconds the GPU is busy per call of ``step``: the summed durations of the kernels and
    copies the profiler records over ``steps`` calls (CUDA graph replays included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)
    return busy_us / 1e3 / steps


def timer(device):
    if device.type == "cuda":
        def measure(fn, reps):
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    else:
        def measure(fn, reps):
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t))
            return statistics.median(times)
    return measure


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--past", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-graphs", action="store_true", help="also run each recipe without CUDA graphs")
    ap.add_argument("--auto", action="store_true", help="also run each recipe through target='auto'")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of 3 decode steps per row")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.reps + 4 > HEADROOM:
        ap.error(f"--reps at most {HEADROOM - 4}: each row decodes reps + 4 tokens into the cache's {HEADROOM} free slots")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("no CUDA device: only `TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --smoke` runs here")
        return 2
    if args.smoke:
        args.layers, args.past, args.prefill, args.reps = 2, 8, 16, 2
    dtype = torch.bfloat16
    model, cfg = build(args.layers, args.smoke, device, dtype)
    measure = timer(device)
    measure_steps = steps_timer(device)

    import qcompiler

    from transformers import StaticCache

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.past), generator=gen).to(device)
    prefill_ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=gen).to(device)
    token = torch.randint(0, cfg.vocab_size, (1, 1), generator=gen).to(device)
    position = torch.tensor([args.past], device=device)
    calib = [torch.randint(0, cfg.vocab_size, (1, min(256, args.prefill)), generator=gen).to(device) for _ in range(2)]

    def prompt_cache():
        """A static cache holding the prompt's keys and values (filled by the bf16 model, eagerly)."""
        cache = StaticCache(config=cfg, max_cache_len=args.past + HEADROOM)
        model(prompt, past_key_values=cache, cache_position=torch.arange(args.past, device=device), use_cache=True)
        return cache

    with torch.no_grad():
        ref_logits = model(token, past_key_values=prompt_cache(), cache_position=position, use_cache=True).logits.float()

    graphs = device.type == "cuda"  # CUDA graphs need CUDA; the smoke run checks the rows only
    rows = [("bf16 eager", None, None), ("bf16 torch.compile", "inductor", None)]
    if graphs:
        rows.append(("bf16 torch.compile reduce-overhead", "inductor", "reduce-overhead"))
    for r in (r for r in args.recipes.split(",") if r):
        opts = {"recipe": r, "target": "triton", "skip": ["lm_head"]}
        if graphs:
            rows.append((f"qcompile {r} / triton + graphs", "qcompile", {**opts, "cuda_graphs": True}))
        if args.no_graphs or not graphs:
            rows.append((f"qcompile {r} / triton", "qcompile", opts))
        if args.auto:
            rows.append((f"qcompile {r} / auto" + (" + graphs" if graphs else ""), "qcompile",
                         {**opts, "target": "auto", "cuda_graphs": graphs}))
    needs_calibration = any(isinstance(opts, dict) and qcompiler.get_recipe(opts["recipe"]).needs_calibration
                            for _, _, opts in rows)
    if needs_calibration:
        qcompiler.calibrate(model, calib, progress=False)

    lines = [f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU interpreter (no timing)'}; "
             f"torch {torch.__version__}; {args.layers} {'tiny' if args.smoke else 'Llama-7B'} layers, bf16; "
             f"decode after {args.past} tokens; prefill {args.prefill}; ratios over the best bf16 row",
             f"{'row':40} {'decode tok/s':>12} {'vs bf16':>8} {'GPU ms':>7} {'prefill ms':>11} {'vs bf16':>8} {'logit rel err':>13} {'top1':>5} {'quantized':>9}"]
    results = []
    for label, backend, opts in rows:
        torch._dynamo.reset()
        if backend is None:
            fn = model
        elif opts == "reduce-overhead":
            fn = torch.compile(model, backend=backend, mode=opts)
        else:
            fn = torch.compile(model, backend=backend, options=opts)
        with torch.no_grad():
            cache = prompt_cache()

            def step():
                return fn(token, past_key_values=cache, cache_position=position, use_cache=True).logits

            logits = step().float()
            for _ in range(3):  # warm-up: compilation, autotuning and graph capture stay out of the numbers
                step()
                fn(prefill_ids, use_cache=False)
            decode_ms = measure_steps(step, args.reps)
            busy_ms = gpu_ms_per_step(step) if device.type == "cuda" else float("nan")
            if args.profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step()
                    torch.cuda.synchronize()
                print(f"## {label}: 3 decode steps\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=18,
                                                                                   max_name_column_width=60))
            prefill_ms = measure(lambda: fn(prefill_ids, use_cache=False), max(3, args.reps // 5))
        # how many linears this row really runs quantized (a row that quantized nothing is no result)
        quantized = 0 if backend != "qcompile" else sum(
            r.scheme not in ("floating point", "not compiled") for r in qcompiler.explain(fn))
        truth = ref_logits
        if backend == "qcompile":  # the same quantized weights on the plain-torch reference q-ops
            report = qcompiler.explain(fn)
            kernels = [line for line in str(report).splitlines() if " x linear_" in line or " x attention_" in line]
            ran = [f"runs on {g.running}" + (f" ({g.reason})" if g.reason else "") for g in report.graphs]
            print("\n".join(f"  {line}" for line in ran[:2] + kernels[:8]), flush=True)
            torch._dynamo.reset()
            ref_fn = torch.compile(model, backend="qcompile", options={**opts, "target": "reference", "cuda_graphs": False})
            with torch.no_grad():
                truth = ref_fn(token, past_key_values=prompt_cache(), cache_position=position, use_cache=True).logits.float()
            del ref_fn
        err = ((logits - truth).norm() / truth.norm()).item()
        top1 = (logits.argmax(-1) == truth.argmax(-1)).float().mean().item()
        results.append((label, 1e3 / decode_ms, busy_ms, prefill_ms, err, top1, quantized))
        print(f"{label:40} {1e3 / decode_ms:12.1f} {busy_ms:7.2f} {prefill_ms:11.1f} {err:13.2e} {top1:5.2f} {quantized:9d}",
              flush=True)
        del fn, cache
    best = [(tok_s, ms) for label, tok_s, _, ms, *_ in results if label.startswith("bf16")]
    best_tok_s, best_ms = max(t for t, _ in best), min(m for _, m in best)
    for label, tok_s, busy_ms, prefill_ms, err, top1, quantized in results:
        lines.append(f"{label:40} {tok_s:12.1f} {tok_s / best_tok_s:7.2f}x {busy_ms:7.2f} {prefill_ms:11.1f} "
                     f"{best_ms / prefill_ms:7.2f}x {err:13.2e} {top1:5.2f} {quantized:9d}")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
