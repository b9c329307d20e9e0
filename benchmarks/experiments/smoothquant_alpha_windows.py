"""Can perplexity tell SmoothQuant's ``alpha="auto"`` from a fixed alpha? Paired per-window differences.

SmolLM2-135M, ``w8a8-smoothquant`` (static per-tensor INT8 activations) on the ``reference``
target, calibrated on ``--calib`` windows and scored on ``--windows`` held-out windows of
``--window`` tokens (the slow acceptance test's split). For ``alpha="auto"`` and each fixed alpha:
the perplexity against FP32, and per held-out window the difference of mean next-token NLL
between ``auto`` and that alpha: its mean and its standard error over windows. A mean inside two
standard errors is an ordering these windows cannot resolve.

    python benchmarks/experiments/smoothquant_alpha_windows.py [--alphas 0.5 0.65 0.8] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import qcompiler
from qcompiler.bundled import zoo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.65, 0.8])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = zoo.load_smollm2()
    cal, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), args.window, args.calib, args.windows)
    base = zoo.window_nll(model, held)
    with qcompiler.calibrate(model, cal.split(1), progress=False):
        pass
    nll = {}
    for alpha in ["auto", *args.alphas]:
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile",
                             options={"recipe": "w8a8-smoothquant", "alpha": alpha, "target": "reference"})
        nll[alpha] = zoo.window_nll(fast, held)
        print(alpha, math.exp((nll[alpha] - base).mean().item()) - 1, flush=True)
    rows = ["| alpha | perplexity vs FP32 | auto minus this alpha, mean NLL per window (nats) | standard error | "
            "mean / standard error |", "|---|---|---|---|---|"]
    for alpha, v in nll.items():
        loss = 100 * (math.exp((v - base).mean().item()) - 1)
        if alpha == "auto":
            rows.append(f"| auto | {loss:+.2f}% | | | |")
            continue
        d = nll["auto"] - v
        se = d.std().item() / math.sqrt(len(d))
        rows.append(f"| {alpha} | {loss:+.2f}% | {d.mean().item():+.5f} | {se:.5f} | {d.mean().item() / se:+.2f} |")
    body = "\n".join(rows)
    print(body)
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from results_page import write_page

        text = __doc__.split("\n\n    python")[0].split("\n", 1)[1].strip()
        write_page(args.markdown, "SmoothQuant alpha: auto against fixed alphas, per held-out window",
                   f"{text}\n\n{args.threads} threads, {args.calib} calibration and {args.windows} held-out windows "
                   f"of {args.window} tokens.\n\n{body}\n")


if __name__ == "__main__":
    main()
