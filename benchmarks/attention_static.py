"""Static 8-bit attention (the TensorRT form) on SmolLM2-135M.

The static-activation recipes run attention as ``qcompile::attention_q8_static`` when
``attention`` is set: calibrated constant scales for Q, K and V (per tensor, after a calibrated
per-channel smoothing of Q and K and a calibrated K shift) and a fixed scale for the
probabilities, the Q/DQ placement TensorRT's explicit quantization takes. Each ``--recipes`` entry
``recipe:format`` is calibrated on ``--calib`` disjoint 512-token windows and compiled with
``attention=None`` and with the format (target ``--target``); rows: perplexity on held-out windows
of ``--context`` tokens, and the mean KL divergence of each token's next-token distribution from
the same recipe with floating-point attention.

    python benchmarks/attention_static.py [--windows 4] [--context 2048] --markdown docs/results/attention_static.md
"""
from __future__ import annotations

import argparse

import torch

import qcompiler
from attention_kv import attention_table
from qcompiler.bundled import zoo


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of --context tokens")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calib", type=int, default=8, help="calibration windows of 512 tokens")
    ap.add_argument("--recipes", default="w8a8-smoothquant:int8,fp8-static:fp8", help="recipe:format, comma separated")
    ap.add_argument("--target", default="inductor")
    ap.add_argument("--markdown", help="write the results page here")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib, held = zoo.lm_windows(ids, 512, args.calib, 0)[0], zoo.lm_windows(ids, args.context, 0, args.windows)[1]
    qcompiler.calibrate(model, [{"input_ids": w[None]} for w in calib], progress=False)
    sections = []
    for entry in args.recipes.split(","):
        recipe, fmt = entry.split(":")
        print(f"{recipe} + attention {fmt}", flush=True)
        sections.append((f"{recipe}: attention {fmt} (static) against floating-point attention "
                         f"(target {args.target}, {args.windows} windows of {args.context} tokens)",
                         attention_table(model, held, recipe, args.target, formats=(fmt,))))
    body = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
    print(body)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "Static 8-bit attention (TensorRT form): SmolLM2-135M",
                   __doc__.split("\n\n    python")[0] + "\n\n" + body)


if __name__ == "__main__":
    main()
