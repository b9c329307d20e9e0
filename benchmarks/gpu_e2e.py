"""End to end on the GPU: a Llama-style decoder, bf16 torch.compile against each recipe on the triton target.

The model is built from a transformers ``LlamaConfig`` (hidden 4096, intermediate 11008, 32
heads: Llama-2-7B's layer, random weights, bf16) with ``--layers`` layers. Per row:
  decode  one token at a time after a ``--past``-token prompt (KV cache kept at that length by
          cropping it after each step, so every step has the same shapes), tokens/s
  prefill one ``--prefill``-token forward, milliseconds
  logits  relative error and top-1 agreement of the decode logits against bf16 eager
Rows: bf16 eager, bf16 torch.compile (Inductor), then qcompile w8a8 / w8a8-smoothquant / fp8 /
w8a16 / w4a16 through ``target="triton"``. Times are medians of CUDA-event-timed repeats.

    python benchmarks/gpu_e2e.py [--layers 8] [--past 512] [--prefill 2048] [--recipes w4a16,w8a16]
    TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --smoke   # CPU, a tiny config: checks the rows only
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

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
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not (args.smoke and os.environ.get("TRITON_INTERPRET") == "1"):
        print("no CUDA device: only `TRITON_INTERPRET=1 python benchmarks/gpu_e2e.py --smoke` runs here")
        return 2
    if args.smoke:
        args.layers, args.past, args.prefill, args.reps = 2, 8, 16, 2
    dtype = torch.bfloat16
    model, cfg = build(args.layers, args.smoke, device, dtype)
    measure = timer(device)

    import qcompiler

    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.past), generator=gen).to(device)
    prefill_ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), generator=gen).to(device)
    token = torch.randint(0, cfg.vocab_size, (1, 1), generator=gen).to(device)
    calib = [torch.randint(0, cfg.vocab_size, (1, min(256, args.prefill)), generator=gen).to(device) for _ in range(2)]
    with torch.no_grad():
        prompt_cache = model(prompt, use_cache=True).past_key_values
        ref_logits = model(token, past_key_values=copy.deepcopy(prompt_cache), use_cache=True).logits.float()

    rows = [("bf16 eager", None, None), ("bf16 torch.compile", "inductor", None)]
    rows += [(f"qcompile {r} / triton", "qcompile", {"recipe": r, "target": "triton", "skip": ["lm_head"]})
             for r in args.recipes.split(",") if r]
    needs_calibration = any(opts and qcompiler.get_recipe(opts["recipe"]).needs_calibration for _, _, opts in rows)
    if needs_calibration:
        qcompiler.calibrate(model, calib, progress=False)

    lines = [f"# {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU interpreter (no timing)'}; "
             f"{args.layers} {'tiny' if args.smoke else 'Llama-7B'} layers, bf16; decode after {args.past} tokens; prefill {args.prefill}",
             f"{'row':34} {'decode tok/s':>12} {'vs bf16':>8} {'prefill ms':>11} {'vs bf16':>8} {'logit rel err':>13} {'top1':>5} {'quantized':>9}"]
    base = None
    for label, backend, opts in rows:
        torch._dynamo.reset()
        fn = model if backend is None else torch.compile(model, backend=backend, options=opts)
        cache = copy.deepcopy(prompt_cache)

        def step():
            out = fn(token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: same shapes every step, no recompiles
            return out.logits

        with torch.no_grad():
            logits = step().float()
            for _ in range(2):  # warm-up: compilation and autotuning stay out of the numbers
                step()
                fn(prefill_ids)
            decode_ms = measure(step, args.reps)
            prefill_ms = measure(lambda: fn(prefill_ids), max(3, args.reps // 5))
        err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        # how many linears this row really runs quantized (a row that quantized nothing is no result)
        quantized = 0 if backend != "qcompile" else sum(
            r.scheme not in ("floating point", "not compiled") for r in qcompiler.explain(fn))
        tok_s = 1e3 / decode_ms
        base = base or (tok_s, prefill_ms)
        lines.append(f"{label:34} {tok_s:12.1f} {tok_s / base[0]:7.2f}x {prefill_ms:11.1f} {base[1] / prefill_ms:7.2f}x "
                     f"{err:13.2e} {top1:5.2f} {quantized:9d}")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
