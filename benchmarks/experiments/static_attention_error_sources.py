"""Where static 8-bit attention (``qcompile::attention_q8_static``) loses accuracy on SmolLM2-135M:
the SQNR of each layer's attention output against floating-point attention, on a held-out window
of ``--context`` tokens, with every step quantized and with one step alone (Q/K, P, V), without
the calibrated Q/K smoothing, and with one smoothing factor per channel instead of per rotary
pair; constants calibrated on ``--calib`` disjoint windows of ``--calib-window`` tokens.

    python benchmarks/experiments/static_attention_error_sources.py [--context 2048] [--calib 8] [--calib-window 512] \
        [--formats int8,fp8] \
        [--markdown docs/results/static_attention_error_sources.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import qcompiler
from qcompiler.bundled import zoo
from qcompiler.calibration.state import state_of
from qcompiler.ir.attention import _repeat_heads, score_mask
from qcompiler.ir.numerics import FP8, round_clamp
from qcompiler.passes import attention_static
from qcompiler.passes.sqnr import sqnr_db


class Capture(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args[0].clone(), args[1].clone(), args[2].clone(), kwargs.get("is_causal", False),
                               kwargs.get("attn_mask"), kwargs.get("scale")))
        return func(*args, **kwargs)


def run(q, k, v, causal, mask, scale, c, qdtype, quantize: set):
    """attention_q8_static's steps, each quantized only when named in ``quantize`` (qk, p, v)."""
    f32, heads = torch.float32, q.shape[1]
    qs = q.to(f32) * c.q_mul
    ks = _repeat_heads((k.to(f32) - c.k_shift) * c.k_mul, heads)
    if "qk" in quantize:
        qs = round_clamp(qs / c.q_scale, torch.int8).to(f32) * c.q_scale
        ks = round_clamp(ks / c.k_scale, torch.int8).to(f32) * c.k_scale
    s = (qs.double() @ ks.double().transpose(-1, -2)).float() * (q.shape[-1] ** -0.5 if scale is None else scale)
    m = score_mask(mask, causal, q.shape[-2], k.shape[-2], q.device)
    p = torch.softmax(s if m is None else s + m, -1)
    vv = _repeat_heads(v.to(f32), heads)
    if "p" in quantize:
        p = round_clamp(p / c.p_scale, qdtype).to(f32) * c.p_scale
    if "v" in quantize:
        vv = round_clamp(vv / c.v_scale, qdtype).to(f32) * c.v_scale
    return (p.double() @ vv.double()).float()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--calib-window", type=int, default=512)
    ap.add_argument("--formats", default="int8,fp8")
    ap.add_argument("--markdown", help="write the results page here")
    args = ap.parse_args(argv)
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib, _ = zoo.lm_windows(ids, args.calib_window, args.calib, 0)
    _, held = zoo.lm_windows(ids, args.context, 0, 1)
    qcompiler.calibrate(model, [{"input_ids": w[None]} for w in calib], progress=False)
    stats = state_of(model).attention
    cap = Capture()
    with torch.no_grad(), cap:
        model(input_ids=held[:1])
    names = sorted(stats, key=lambda n: int(n.split(".")[2]))
    tables = [table(names, stats, cap.calls, fmt, f"{args.context} tokens, calibrated on {args.calib} x "
                    f"{args.calib_window}") for fmt in args.formats.split(",")]
    body = "\n\n".join(tables)
    print(body)
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from results_page import write_page

        write_page(args.markdown, "Static 8-bit attention: where the error comes from (SmolLM2-135M)",
                   __doc__.split("\n\n    python")[0] + "\n\n" + body)


def table(names, stats, calls, fmt: str, setting: str) -> str:
    """Per-layer attention output SQNR (dB) against floating-point attention, min / median / max."""
    qdtype = torch.int8 if fmt == "int8" else FP8
    rows = {"all": {"qk", "p", "v"}, "Q/K only": {"qk"}, "P only": {"p"}, "V only": {"v"}}
    results = {r: [] for r in [*rows, "all, no Q/K smoothing", "all, smoothing per channel"]}
    for name, (q, k, v, causal, mask, scale) in zip(names, calls):
        st = attention_static.regrouped(stats[name], k.shape[1])
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        c = attention_static.constants(st, qdtype)
        for label, steps in rows.items():
            results[label].append(sqnr_db(ref, run(q, k, v, causal, mask, scale, c, qdtype, steps)))
        plain = attention_static.constants(st, qdtype, migration=0.0)
        results["all, no Q/K smoothing"].append(sqnr_db(ref, run(q, k, v, causal, mask, scale, plain, qdtype,
                                                                  rows["all"])))
        per_channel = attention_static.constants(st, qdtype, rotary_pairs=False)
        results["all, smoothing per channel"].append(sqnr_db(ref, run(q, k, v, causal, mask, scale, per_channel,
                                                                       qdtype, rows["all"])))
    lines = [f"| {fmt}, {setting}: quantized step | SQNR min | median | max |", "|---|---:|---:|---:|"]
    for label, values in results.items():
        lines.append(f"| {label} | {min(values):.1f} | {statistics.median(values):.1f} | {max(values):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
