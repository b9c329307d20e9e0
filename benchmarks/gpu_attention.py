"""The fused 8-bit attention kernel against bf16 attention on one CUDA GPU, in the same run.

Shapes are SmolLM2-135M's (9 query heads, 3 KV heads, head size 64) and a Llama-7B-sized head
set (32 x 128), at prefill (one sequence of ``--context`` tokens, causal) and at decode (a batch
of one-token queries over ``--context`` cached tokens). Rows: ``F.scaled_dot_product_attention``
in bf16 (PyTorch's FlashAttention / cuDNN kernels) and ``qcompile::attention_q8`` INT8 / FP8 on the
Triton kernel (the Q / K / V quantization passes before it included), each checked against float64
attention (output SQNR).

A second table is decode over a quantized KV cache (``qcompiler.ir.kv``: all but the newest
``RESIDUAL`` tokens quantized): bf16 SDPA over a bf16 cache, the unfused read (dequantize the
codes, concatenate, bf16 SDPA: what a cache read costs without the fused op), and
``qcompile::attention_quantized_kv`` on its Triton kernel (the codes read tile by tile), each
output checked against float64 attention over the unquantized cache.

    python benchmarks/gpu_attention.py [--context 2048] [--out gpu_attention.txt]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from qcompiler.ir import ops
from qcompiler.passes.sqnr import sqnr_db

SHAPES = [  # (label, batch, query heads, kv heads, head size, query length or None = context)
    ("SmolLM2 prefill", 1, 9, 3, 64, None),
    ("SmolLM2 decode x16", 16, 9, 3, 64, 1),
    ("Llama-7B prefill", 1, 32, 32, 128, None),
    ("Llama-7B decode x16", 16, 32, 32, 128, 1),
]


RESIDUAL = 128
KV_SCHEMES = ("int8", "fp8", "int4")


def kv_cache_table(context: int, reps: int) -> list:
    """Decode rows over a quantized KV cache (module docstring)."""
    from qcompiler.ir import kv, kv_attention
    from qcompiler.runtimes import triton_kv_attention

    lines = [f"# decode over a quantized KV cache of {context} tokens ({RESIDUAL} newest in bf16)",
             "| shape | scheme | bf16 SDPA ms (bf16 cache) | unfused read + SDPA ms | fused ms | vs bf16 SDPA | "
             "vs unfused | SQNR dB | kernel vs reference dB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, b, hq, hkv, d, lq in SHAPES:
        if lq != 1:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, hq, 1, d, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, context, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, context, d, device="cuda", generator=g, dtype=torch.bfloat16)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=hq != hkv)
        base = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv), reps)
        lc = context - RESIDUAL
        for scheme in KV_SCHEMES:
            group = 32 if scheme == "int4" else 64
            qk, qv = kv.quantize(k[..., :lc, :], scheme, "channel", group), kv.quantize(v[..., :lc, :], scheme, "token", group)
            args = (q, qk.codes, qk.scale, qk.offset, k[..., lc:, :], qv.codes, qv.scale, qv.offset, v[..., lc:, :],
                    None, False, None, scheme, qk.group, qv.group)

            def unfused():
                keys = kv_attention.cache_tensor(qk.codes, qk.scale, qk.offset, k[..., lc:, :], scheme, "channel", qk.group)
                values = kv_attention.cache_tensor(qv.codes, qv.scale, qv.offset, v[..., lc:, :], scheme, "token", qv.group)
                return F.scaled_dot_product_attention(q, keys, values, enable_gqa=hq != hkv)

            fused = lambda: triton_kv_attention.attention_quantized_kv(*args)  # noqa: E731
            out, ref = fused(), torch.ops.qcompile.attention_quantized_kv(*args)
            t_unfused, t_fused = time_ms(unfused, reps), time_ms(fused, reps)
            row = (f"| {label} | {scheme} | {base:.3f} | {t_unfused:.3f} | {t_fused:.3f} | {base / t_fused:.2f}x | "
                   f"{t_unfused / t_fused:.2f}x | {sqnr_db(exact, out.float()):.1f} | "
                   f"{sqnr_db(ref.float(), out.float()):.1f} |")
            lines.append(row)
            print(row, flush=True)
    return lines


def time_ms(fn, reps: int) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, rep=reps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=100, help="milliseconds of timing per row (triton do_bench)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_attention.py needs a CUDA device")
    from qcompiler.runtimes import triton_attention

    lines = [f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, context {args.context}",
             "| shape | bf16 SDPA ms | int8 ms | int8 speed | int8 SQNR dB | fp8 ms | fp8 speed | fp8 SQNR dB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, b, hq, hkv, d, lq in SHAPES:
        lq = lq or args.context
        causal = lq > 1
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, hq, lq, d, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, args.context, d, device="cuda", generator=g, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, args.context, d, device="cuda", generator=g, dtype=torch.bfloat16)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                               enable_gqa=hq != hkv)
        base = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv),
                       args.reps)
        row = f"| {label} (Lq {lq}) | {base:.3f} |"
        for qdtype in (torch.int8, ops.FP8):
            fn = lambda: triton_attention.attention_q8(q, k, v, None, causal, None, qdtype)  # noqa: E731
            out = fn()
            ms = time_ms(fn, args.reps)
            row += f" {ms:.3f} | {base / ms:.2f}x | {sqnr_db(exact, out.float()):.1f} |"
        lines.append(row)
        print(row, flush=True)
    lines += [""] + kv_cache_table(args.context, args.reps)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
