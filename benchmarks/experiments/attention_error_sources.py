"""Where 8-bit attention loses accuracy on SmolLM2-135M: each step of ``qcompile::attention_q8``
alone (Q/K per token, P per block of keys, V per channel), and variants of the Q/K step, on top of
a recipe (inductor target): perplexity on held-out 512-token windows and the mean KL divergence
from the model with floating-point attention. (P's fixed-scale and 256-level variants were
measured at commit 9e34765, before P got per-block scales: docs/experiments.md.)

    python benchmarks/experiments/attention_error_sources.py [--windows 4] [--variants qk,p,v,all,qk-g32] [--recipe w8a16]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import qcompiler
from qcompiler.bundled import zoo
from qcompiler.ir import attention


@contextlib.contextmanager
def patched(**functions):
    saved = {name: getattr(attention, name) for name in functions}
    for name, fn in functions.items():
        setattr(attention, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(attention, name, fn)


def _float_rows(x, qdtype):  # "quantize" that keeps the values: codes = x, scale = 1
    x = x.to(torch.float32)
    return x, torch.ones((*x.shape[:-1], 1))


def _float_p(p, qdtype):  # P kept: blocks of P_BLOCK keys with scale 1
    n = p.shape[-1]
    blocks = torch.nn.functional.pad(p, (0, -n % attention.P_BLOCK)).reshape(*p.shape[:-1], -1, attention.P_BLOCK)
    return blocks, torch.ones(blocks.shape[:-1])


def _float_v(v, qdtype):
    return v, torch.ones((*v.shape[:-2], 1, v.shape[-1]))


def _quantized_v(v, qdtype):  # V per channel through the unpatched row quantizer
    q, s = _ROWS(v.transpose(-1, -2), qdtype)
    return q.transpose(-1, -2), s.transpose(-1, -2)


def _fake_groups(group):
    """Q and K rows quantized in groups of ``group`` channels (codes returned dequantized, scale 1)."""
    def rows(x, qdtype):
        x = x.to(torch.float32)
        codes, scale = _ROWS(x.reshape(*x.shape[:-1], -1, group), qdtype)
        return (codes.to(torch.float32) * scale).reshape(x.shape), torch.ones((*x.shape[:-1], 1))
    return rows


def _q_smoothed():
    """Q minus its mean over tokens quantized, the mean's product with K added back exactly
    (SageAttention2); K as the q-op has it. Calls alternate Q, K."""
    calls = []

    def rows(x, qdtype):
        calls.append(1)
        x = x.to(torch.float32)
        if len(calls) % 2 == 1:  # Q
            mean = x.mean(dim=-2, keepdim=True)
            codes, scale = _ROWS(x - mean, qdtype)
            return codes.to(torch.float32) * scale + mean, torch.ones((*x.shape[:-1], 1))
        return _ROWS(x, qdtype)
    return rows


_ROWS = attention.quantize_rows

VARIANTS = {  # name -> the steps kept in floating point (patched) or changed
    "all": {},
    "none": {"quantize_rows": _float_rows, "quantize_values": _float_v, "quantize_probabilities": _float_p},
    "qk": {"quantize_probabilities": _float_p, "quantize_values": _float_v},
    "p": {"quantize_rows": _float_rows, "quantize_values": _float_v},
    "v": {"quantize_rows": _float_rows, "quantize_values": _quantized_v, "quantize_probabilities": _float_p},
    "qk-g32": {"quantize_probabilities": _float_p, "quantize_values": _float_v, "quantize_rows": _fake_groups(32)},
    "qk-qsmooth": {"quantize_probabilities": _float_p, "quantize_values": _float_v, "quantize_rows": "q-smooth"},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--variants", default="qk,p,v,all")
    ap.add_argument("--formats", default="int8,fp8")
    ap.add_argument("--recipe", default="w8a8-smoothquant-dynamic",
                    help="the linears' recipe (w8a16 has no activation rounding: the cleanest base)")
    args = ap.parse_args(argv)
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib, held = zoo.lm_windows(ids, 512, 8, args.windows)
    qcompiler.calibrate(model, [{"input_ids": w[None]} for w in calib], progress=False)
    options = {"recipe": args.recipe, "target": "inductor"}
    base_model = torch.compile(model, backend="qcompile", options=options)
    base, reference = zoo.perplexity(base_model, held), zoo.log_probs(base_model, held)
    print(f"{args.recipe}, attention in FP: {base:.4f}", flush=True)
    for fmt in args.formats.split(","):
        for name in args.variants.split(","):
            torch._dynamo.reset()
            t = time.time()
            variant = {k: (_q_smoothed() if f == "q-smooth" else f) for k, f in VARIANTS[name].items()}
            with patched(**variant):
                fast = torch.compile(model, backend="qcompile", options=dict(options, attention=fmt))
                ppl = zoo.perplexity(fast, held)
                kl = zoo.mean_kl(reference, fast, held)
            print(f"{fmt} {name} quantized: {ppl:.4f} ({100 * (ppl / base - 1):+.2f}%), mean KL to the FP-attention "
                  f"model {kl:.2e} nats/token, {time.time() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
