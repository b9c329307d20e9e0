"""What a quantization-aware training step's settings cost and buy, on SmolLM2-135M W4A16 (sym g64).

Short runs of ``qcompiler.qat.distill`` from round to nearest, one row per setting (matmul dtype,
learning rates): seconds per step and the held-out perplexity after the run, measured on the
prepared model in eval mode (for weight-only INT4 it computes what the compiled model computes, bit
for bit: ``tests/integration/test_qat_models.py``). And the distillation loss alone: KL of the
next-token distributions of one 4 x 256-token batch (49152-token vocabulary), forward and backward,
chunked (``qcompiler.algorithms.logits_kl``) against ``log_softmax`` + ``kl_div``.

    python benchmarks/qat_settings.py [--steps 40] [--settings fp32,bf16,bf16-lr2,bf16-scales] \
        [--markdown docs/results/qat_settings.md]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import qcompiler.qat as qat
from qcompiler.algorithms.logits_kl import logits_kl
from qcompiler.bundled import zoo

W4 = {"recipe": "w4a16", "group_size": 64, "symmetric": True}
# name -> (label, autocast, lr, scale_lr)
SETTINGS = {
    "fp32": ("float32, lr 1e-4", None, 1e-4, None),
    "bf16": ("bfloat16 autocast, lr 1e-4", torch.bfloat16, 1e-4, None),
    "bf16-lr2": ("bfloat16 autocast, lr 2e-4", torch.bfloat16, 2e-4, None),
    "bf16-scales": ("bfloat16 autocast, lr 1e-4, scales 1e-3", torch.bfloat16, 1e-4, 1e-3),
}


def _kl_seconds(fn, logits, reference, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        logits.grad = None
        t = time.perf_counter()
        fn(logits, reference).backward()
        best = min(best, time.perf_counter() - t)
    return best


def _plain_kl(logits, reference):
    vocab = logits.shape[-1]
    return F.kl_div(torch.log_softmax(logits.float(), -1).reshape(-1, vocab),
                    torch.log_softmax(reference.float(), -1).reshape(-1, vocab), log_target=True, reduction="batchmean")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="distill steps per setting (batch 4 x 256 tokens)")
    ap.add_argument("--windows", type=int, default=8, help="held-out 512-token windows")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"which rows, of {', '.join(SETTINGS)}")
    ap.add_argument("--markdown", help="write the tables as a stamped results page here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("QCOMPILE_THREADS", "2")))

    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    _, held = zoo.lm_windows(ids, 512, 16, args.windows)
    train, _ = zoo.lm_windows(ids, 256, int(len(ids) * 0.7) // 256, args.windows)
    with torch.no_grad():
        base = zoo.perplexity(model, held)
    lines = ["| setting | s / step | held-out ppl | vs FP32 |", "|---|---|---|---|",
             f"| FP32 | | {base:.4f} | |"]
    for name in args.settings.split(","):
        label, autocast, lr, scale_lr = SETTINGS[name]
        m = zoo.load_smollm2()[0]
        qat.prepare(m, W4)
        record = qat.distill(m, train, steps=args.steps, batch_size=4, lr=lr, scale_lr=scale_lr, autocast=autocast,
                             progress=False)
        m.eval()
        with torch.no_grad():
            ppl = zoo.perplexity(m, held)
        lines.append(f"| {label} | {record['seconds'] / args.steps:.2f} | {ppl:.4f} | {100 * (ppl / base - 1):+.2f}% |")
        print(lines[-1], flush=True)

    gen = torch.Generator().manual_seed(0)
    shape = (4, 256, model.config.vocab_size)
    reference = 3 * torch.randn(shape, generator=gen)
    kl_lines = ["| KL, forward and backward | logits float32 (s) | logits bfloat16 (s) |", "|---|---|---|"]
    for label, fn in (("log_softmax + kl_div", _plain_kl), ("logits_kl (row chunks)", logits_kl)):
        cells = []
        for dtype in (torch.float32, torch.bfloat16):
            logits = (reference + torch.randn(shape, generator=gen)).to(dtype).requires_grad_(True)
            cells.append(f"{_kl_seconds(fn, logits, reference.to(dtype)):.3f}")
        kl_lines.append(f"| {label} | {' | '.join(cells)} |")
        print(kl_lines[-1], flush=True)

    body = ("\n".join(lines) + f"\n\n{args.steps} steps of `qcompiler.qat.distill` from round to nearest (W4A16 "
            f"symmetric group 64), batch 4 x 256 tokens of the bundled text's first 70%, 5% warm-up then cosine; "
            f"perplexity on {args.windows} held-out windows of 512 tokens; {torch.get_num_threads()} CPU threads. "
            f"Seconds per step include the first micro-batch's one-time set-up.\n\n" + "\n".join(kl_lines)
            + f"\n\nOne batch of {shape[0]} x {shape[1]} positions over {shape[2]} tokens, best of 3.\n")
    print(body)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "Quantization-aware training: what a step's settings cost and buy", body)


if __name__ == "__main__":
    main()
