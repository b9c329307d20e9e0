"""Quantized KV caches (and quantized attention) on SmolLM2-135M at long context.

Attention: ``--recipe`` (default w8a8-smoothquant-dynamic, calibrated on disjoint text) compiled
with ``attention=None``, "int8" and "fp8" (target inductor), perplexity on held-out windows of
``--context`` tokens in one forward each, and the mean KL divergence of each token's next-token
distribution from the model with floating-point attention (the distortion itself; a perplexity
difference of a few tenths of a percent is within what any 8-bit rounding change moves it by).

KV cache: each held-out window is fed through the cache in chunks of ``--chunk`` tokens, so every
chunk after the first attends over the cached, quantized keys and values of all tokens before it;
every next-token prediction of the window is scored. Rows: the floating-point cache, then each KV
scheme, compared with the floating-point cache of the same model ("vs FP cache"). Models: FP32
eager, and ``--recipe`` compiled (target reference: the q-ops' definition; the cache's growing
length recompiles the graph, which Inductor takes minutes for).

Memory: bytes per token of the quantized part (scales and offsets included) against a float32
cache, and the whole cache (residual window included) at the context length.

Decode latency: after a ``--context``-token prompt, the median time of ``--steps`` single-token
steps with each cache, the caches stepping in turn (eager FP32 model; this CPU, its threads).

    python benchmarks/attention_kv.py [--windows 4] [--context 2048] --markdown docs/results/attention_kv.md
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

import qcompiler
from qcompiler.api.kv_cache import DEFAULT_GROUP, DEFAULT_RESIDUAL, float_bytes_per_token
from qcompiler.bundled import zoo

KV_SCHEMES = [  # (label, scheme, group size)
    ("int8", "int8", DEFAULT_GROUP["int8"]),
    ("fp8 (E4M3)", "fp8", DEFAULT_GROUP["fp8"]),
    ("int4 (asymmetric)", "int4", DEFAULT_GROUP["int4"]),
]


def make_cache(config, scheme):
    if scheme is None:
        return DynamicCache(config=config)
    return qcompiler.QuantizedKVCache(config, scheme[1], group_size=scheme[2], residual=DEFAULT_RESIDUAL)


def perplexity(model, windows, chunk, scheme) -> tuple:
    """(perplexity, the last window's cache) over every window, each through a fresh cache."""
    caches = []

    def fresh():
        caches.append(make_cache(model.config, scheme))
        return caches[-1]

    return zoo.chunked_perplexity(model, windows, chunk, fresh), caches[-1]


@torch.no_grad()
def decode_ms(model, prompt: torch.Tensor, chunk: int, schemes: list, steps: int) -> list:
    """``(median ms, median speed vs the first cache)`` of one decode step with each cache of
    ``schemes`` after ``prompt`` went through it. The caches take their steps in turn (one step
    each, round after round) and the speed is the median over rounds of the round's ratio, so a
    machine getting slower or faster during the run moves every cache alike."""
    caches, tokens = [], []
    for scheme in schemes:
        cache = make_cache(model.config, scheme)
        for start in range(0, prompt.shape[1], chunk):
            out = model(input_ids=prompt[:, start:start + chunk], cache=cache, use_cache=True)
        caches.append(cache)
        tokens.append(out.logits[:, -1:].argmax(-1))
    times = [[] for _ in schemes]
    for step in range(steps + 2):  # two warm-up rounds
        for i, cache in enumerate(caches):
            t = time.perf_counter()
            out = model(input_ids=tokens[i], cache=cache, use_cache=True)
            if step >= 2:
                times[i].append(time.perf_counter() - t)
            tokens[i] = out.logits[:, -1:].argmax(-1)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return [(1000 * median(t), median([a / b for a, b in zip(times[0], t)])) for t in times]


def kv_rows(model, windows, chunk, context, compiled: bool = False):
    """One row per cache. ``compiled``: each row starts from a fresh Dynamo cache with room for
    the recompiles a growing cache causes (every past length of the chunked feed is a new shape;
    past Dynamo's default limit of 8 the frame would run eagerly, unquantized)."""
    def measure(scheme):
        if not compiled:
            return perplexity(model, windows, chunk, scheme)
        torch._dynamo.reset()
        with torch._dynamo.config.patch(recompile_limit=64):
            return perplexity(model, windows, chunk, scheme)

    fp_ppl, fp_cache = measure(None)
    rows = [("floating point (DynamicCache)", fp_ppl, None, fp_cache)]
    for scheme in KV_SCHEMES:
        t = time.time()
        ppl, cache = measure(scheme)
        print(f"  {scheme[0]}: {ppl:.4f} ({time.time() - t:.0f} s)", flush=True)
        rows.append((scheme[0], ppl, 100 * (ppl / fp_ppl - 1), cache))
    return rows


def kv_table(rows, config, context) -> str:
    fp32_token = float_bytes_per_token(config, torch.float32)
    lines = ["| KV cache | perplexity | vs FP cache | quantized part, bytes/token | vs float32 | whole cache at "
             f"{context} tokens |", "|---|---:|---:|---:|---:|---:|"]
    for label, ppl, delta, cache in rows:
        whole = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) \
            if not isinstance(cache, qcompiler.QuantizedKVCache) else cache.nbytes
        if isinstance(cache, qcompiler.QuantizedKVCache):
            per_token = cache.quantized_nbytes / cache.quantized_tokens() * len(cache.layers)
            ratio = f"{per_token / fp32_token:.3f}x"
            per_token = f"{per_token:,.0f}"
        else:
            per_token, ratio = f"{fp32_token:,} (float32)", "1x"
        lines.append(f"| {label} | {ppl:.3f} | {'' if delta is None else f'{delta:+.2f}%'} | {per_token} | {ratio} "
                     f"| {whole / 2**20:.1f} MiB |")
    return "\n".join(lines)


def attention_table(model, windows, recipe: str, target: str, formats=("int8", "fp8")) -> str:
    lines = ["| attention | perplexity | vs FP attention | mean KL to FP attention (nats/token) | attention SQNR "
             "(dB, min / median over layers) |", "|---|---:|---:|---:|---:|"]
    base = None
    for fmt in (None, *formats):
        torch._dynamo.reset()
        t = time.time()
        fast = torch.compile(model, backend="qcompile", options={"recipe": recipe, "attention": fmt, "target": target})
        ppl = zoo.perplexity(fast, windows)
        if base is None:
            base, reference = ppl, zoo.log_probs(fast, windows)
            lines.append(f"| floating point | {ppl:.3f} | | | |")
            continue
        kl = zoo.mean_kl(reference, fast, windows)
        sqnr = sorted(r.sqnr_db for r in qcompiler.explain(fast) if r.op == "attention" and r.sqnr_db is not None)
        spread = f"{sqnr[0]:.1f} / {sqnr[len(sqnr) // 2]:.1f}" if sqnr else "n/a"
        lines.append(f"| {fmt} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {kl:.2e} | {spread} |")
        print(f"  attention {fmt}: {ppl:.4f} vs {base:.4f}, KL {kl:.2e} ({time.time() - t:.0f} s)", flush=True)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of --context tokens")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256, help="tokens per forward through the cache")
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed per cache")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 512 tokens (--recipe)")
    ap.add_argument("--recipe", default="w8a8-smoothquant-dynamic", help="the compiled model's recipe ('' skips it)")
    ap.add_argument("--kv-target", default="reference", help="target of the compiled model's KV-cache rows")
    ap.add_argument("--attention-target", default="inductor")
    ap.add_argument("--skip-kv-recipe", action="store_true", help="only the FP32 model's KV-cache rows")
    ap.add_argument("--markdown", help="write the results page here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    _, held = zoo.lm_windows(ids, args.context, 0, args.windows)
    sections = []

    print(f"FP32 model, {args.windows} windows of {args.context} tokens, chunks of {args.chunk}", flush=True)
    rows = kv_rows(model, held, args.chunk, args.context)
    sections.append(("FP32 model (eager)", kv_table(rows, model.config, args.context)))

    if args.recipe:
        calib, _ = zoo.lm_windows(ids, 512, args.calib, 0)
        qcompiler.calibrate(model, [{"input_ids": w[None]} for w in calib], progress=False)
        sections.append((f"Attention on top of {args.recipe} (target {args.attention_target}, "
                         f"{args.windows} windows of {args.context} tokens)",
                         attention_table(model, held, args.recipe, args.attention_target)))
        if not args.skip_kv_recipe:
            torch._dynamo.reset()
            forward = model.forward
            model.forward = torch.compile(forward, backend="qcompile", options={"recipe": args.recipe,
                                                                                 "target": args.kv_target})
            print(f"KV cache, {args.recipe} ({args.kv_target})", flush=True)
            rows = kv_rows(model, held, args.chunk, args.context, compiled=True)
            sections.append((f"KV cache on top of {args.recipe} (compiled, target {args.kv_target})",
                             kv_table(rows, model.config, args.context)))
            model.forward = forward
        torch._dynamo.reset()
        model, _ = zoo.load_smollm2()

    lat = ["| KV cache | decode step at %d tokens | speed vs FP cache |" % args.context, "|---|---:|---:|"]
    (base, _), *times = decode_ms(model, held[0][None], args.chunk, [None, *KV_SCHEMES], args.steps)
    lat.append(f"| floating point (DynamicCache) | {base:.1f} ms | 1x |")
    for scheme, (ms, speed) in zip(KV_SCHEMES, times):
        lat.append(f"| {scheme[0]} | {ms:.1f} ms | {speed:.2f}x |")
        print(f"  decode {scheme[0]}: {ms:.1f} ms vs {base:.1f} ms ({speed:.2f}x)", flush=True)
    sections.append((f"Decode latency (FP32 eager model, batch 1, {torch.get_num_threads()} threads)",
                     "\n".join(lat)))

    body = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
    print(body)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "Quantized KV cache: SmolLM2-135M at long context", __doc__.split("\n\n    python")[0]
                   + "\n\n" + body)


if __name__ == "__main__":
    main()
