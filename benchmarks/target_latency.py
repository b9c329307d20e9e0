"""Latency of each qcompile target on a Llama-style decoder with random weights, on any device.

Used to choose ``lowering.AUTO`` where the real-model benchmark (cpu_latency.py) cannot run
(the GPU machine has no model packages). Configurations are timed interleaved (round-robin,
median), so read the ratios to eager in the same run.

    python benchmarks/target_latency.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import qcompiler  # noqa: F401

CONFIGS = [
    ("eager", None, None),
    ("torch.compile", "inductor", None),
    ("qcompile w8a8 / reference", "qcompile", {"recipe": "w8a8", "target": "reference"}),
    ("qcompile w8a8 / inductor", "qcompile", {"recipe": "w8a8", "target": "inductor"}),
    ("qcompile w8a16 / reference", "qcompile", {"recipe": "w8a16", "target": "reference"}),
    ("qcompile w8a16 / inductor", "qcompile", {"recipe": "w8a16", "target": "inductor"}),
]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128)
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    shapes = {"prefill 1x512": torch.randint(0, 32000, (1, 512), device=device),
              "batch 16x1": torch.randint(0, 32000, (16, 1), device=device),
              "decode 1x1": torch.randint(0, 32000, (1, 1), device=device)}
    print(f"device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} dtype={dtype} "
          f"hidden={args.hidden} layers={args.layers} torch={torch.__version__}")
    print(f"{'shape':16} {'configuration':30} {'median ms':>10} {'vs eager':>9}")
    for sname, ids in shapes.items():
        fns = {}
        for label, backend, options in CONFIGS:
            fn = model if backend is None else (torch.compile(model, backend=backend, options=options)
                                                if options else torch.compile(model, backend=backend))
            with torch.no_grad():
                fn(input_ids=ids, use_cache=False)
                fn(input_ids=ids, use_cache=False)
            fns[label] = fn
        times = {label: [] for label in fns}
        with torch.no_grad():
            for _ in range(args.rounds):
                for label, fn in fns.items():
                    sync(device)
                    t = time.perf_counter()
                    fn(input_ids=ids, use_cache=False)
                    sync(device)
                    times[label].append(time.perf_counter() - t)
        eager = statistics.median(times["eager"])
        for label, v in times.items():
            m = statistics.median(v)
            print(f"{sname:16} {label:30} {1e3 * m:10.3f} {eager / m:8.2f}x")


if __name__ == "__main__":
    main()
