"""Quantization-aware training on SmolLM2-135M: what training buys over post-training quantization.

Held-out perplexity (the bundled Wikipedia text's last 30%, 512-token windows) of FP32, of
post-training quantization (round to nearest; GPTQ) and of ``qcompiler.qat`` started from each,
every quantized row measured through ``torch.compile(backend="qcompile")`` on the reference target
after ``qcompiler.qat.convert`` (accuracy guards off: training measured the whole model). QAT rows
say their steps, training time (prepare to convert) and the process's peak memory while training
(resident set, sampled; the process holds the float model and the benchmark's data too). The
``w4-blockwise`` row trains block by block first (``qcompiler.qat.blockwise``: each block's output
against the float block's, EfficientQAT's Block-AP), then end to end; its time includes both. The W4A16 model trained from GPTQ is also written as a compressed-tensors checkpoint
and loaded back with transformers: its perplexity must equal qcompile's.

Training data: 256-token windows of the text's first 70% (GPTQ's calibration windows come from
there too), batch 4, distilled from the model's own float weights (``qcompiler.qat.distill``).

    python benchmarks/qat.py [--steps 170] [--w8a8-steps 60] [--lr 1e-4] [--scale-lr 1e-3] \
        [--autocast bfloat16|none] [--rows w4-rtn,w4-gptq,w8a8,w4-blockwise] [--blockwise 128] \
        [--blockwise-epochs 2] [--blockwise-lr 1e-4] [--blockwise-steps 200] [--markdown docs/results/qat.md]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import threading
import time

import torch

import qcompiler
import qcompiler.qat as qat
from qcompiler.bundled import zoo

W4 = {"recipe": "w4a16", "group_size": 64, "symmetric": True}
W4_GPTQ = {**W4, "recipe": "w4a16-gptq"}
W8A8 = {"recipe": "w8a8"}
GUARDS_OFF = {"min_sqnr_db": None, "max_static_loss_db": None}


class PeakMemory:
    """The process's peak resident set while the block runs (sampled every 0.2 s), in GB."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()

        def sample():
            while not self._stop.is_set():
                with open("/proc/self/statm") as f:
                    self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
                self._stop.wait(0.2)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 1e9


def compiled_perplexity(model, options, held) -> float:
    torch._dynamo.reset()
    fast = torch.compile(model, backend="qcompile", options={**options, **GUARDS_OFF, "target": "reference"})
    with torch.no_grad():
        return zoo.perplexity(fast, held)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=170, help="W4A16 QAT steps (batch 4 x 256 tokens)")
    ap.add_argument("--w8a8-steps", type=int, default=60, help="w8a8 QAT steps")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the weights")
    ap.add_argument("--scale-lr", type=float, default=None, help="AdamW learning rate of the scales (default: --lr)")
    ap.add_argument("--autocast", choices=("bfloat16", "none"), default="bfloat16",
                    help="the training's matmuls in bfloat16 (torch.autocast), or all float32")
    ap.add_argument("--windows", type=int, default=8, help="held-out 512-token windows")
    ap.add_argument("--calib", type=int, default=16, help="GPTQ calibration windows of 512 tokens")
    ap.add_argument("--blockwise", type=int, default=128, help="w4-blockwise: 256-token sequences per block")
    ap.add_argument("--blockwise-epochs", type=int, default=2, help="w4-blockwise: epochs per block")
    ap.add_argument("--blockwise-lr", type=float, default=1e-4, help="w4-blockwise: AdamW lr, weights and scales")
    ap.add_argument("--blockwise-steps", type=int, default=200, help="w4-blockwise: end-to-end steps after")
    ap.add_argument("--rows", default="w4-rtn,w4-gptq,w8a8", help="which groups of rows (also: w4-blockwise)")
    ap.add_argument("--markdown", help="write the table as a stamped results page here")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("QCOMPILE_THREADS", "2")))
    groups = set(args.rows.split(","))
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)
    from transformers import AutoModelForCausalLM

    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib, held = zoo.lm_windows(ids, 512, args.calib, args.windows)
    train, _ = zoo.lm_windows(ids, 256, int(len(ids) * 0.7) // 256, args.windows)
    with torch.no_grad():
        base = zoo.perplexity(model, held)
    rows, notes = [], []

    def row(label, ppl, steps="", minutes="", memory=""):
        rows.append((label, f"{ppl:.4f}", f"{100 * (ppl / base - 1):+.2f}%", str(steps), minutes, memory))
        print(" | ".join(rows[-1]), flush=True)

    row("FP32", base)

    def trained(label, options, steps, start_from=None, blockwise=0):
        """prepare -> (blockwise ->) distill -> convert on a fresh model (or ``start_from``), then the
        compiled perplexity. ``blockwise``: sequences of the training data the block-wise stage sees."""
        m = start_from if start_from is not None else zoo.load_smollm2()[0]
        t = time.perf_counter()
        with PeakMemory() as peak:
            qat.prepare(m, options)
            if blockwise:
                gen = torch.Generator().manual_seed(1)
                rows = train[torch.randperm(len(train), generator=gen)[:blockwise]]
                block = qat.blockwise(m, rows, epochs=args.blockwise_epochs, batch_size=4, lr=args.blockwise_lr,
                                      autocast=autocast, progress=False)
                notes.append(f"{label}: block-wise stage {block['seconds'] / 60:.1f} min ({block['steps']} steps "
                             f"over {len(block['blocks'])} blocks); relative block error, mean over blocks, first "
                             f"epoch {sum(a for a, _ in block['blocks'].values()) / len(block['blocks']):.4f}, last "
                             f"{sum(b for _, b in block['blocks'].values()) / len(block['blocks']):.4f}")
            record = qat.distill(m, train, steps=steps, batch_size=4, lr=args.lr, scale_lr=args.scale_lr,
                                 autocast=autocast, progress=False)
            qat.convert(m)
        minutes = (time.perf_counter() - t) / 60  # prepare, the timed first batch, the steps, convert
        ppl = compiled_perplexity(m, options, held)
        row(label, ppl, steps, f"{minutes:.1f}", f"{peak.gb:.2f} GB")
        notes.append(f"{label}: distillation loss {record['losses'][0]:.4f} at the first step, "
                     f"{sum(record['losses'][-10:]) / min(10, len(record['losses'])):.4f} over the last ten")
        return m

    if groups & {"w4-rtn", "w4-gptq", "w4-blockwise"}:
        row("W4A16 sym g64, RTN (post-training)", compiled_perplexity(model, W4, held))
    if "w4-rtn" in groups:
        trained("W4A16 sym g64, QAT from RTN", W4, args.steps)
    if "w4-blockwise" in groups:
        trained(f"W4A16 sym g64, QAT from RTN: block-wise ({args.blockwise} sequences x {args.blockwise_epochs} "
                f"epochs, lr {args.blockwise_lr:g}), then end to end", W4, args.blockwise_steps, blockwise=args.blockwise)
    if "w4-gptq" in groups:
        gptq_model = zoo.load_smollm2()[0]
        t = time.perf_counter()
        qcompiler.calibrate(gptq_model, calib.split(1), recipe=W4_GPTQ, progress=False)
        notes.append(f"GPTQ calibration: {args.calib} windows of 512 tokens, {time.perf_counter() - t:.0f} s")
        row("W4A16 sym g64, GPTQ (post-training)", compiled_perplexity(gptq_model, W4_GPTQ, held))
        m = trained("W4A16 sym g64, QAT from GPTQ", W4_GPTQ, args.steps, start_from=gptq_model)
        ours = compiled_perplexity(m, W4_GPTQ, held)
        with tempfile.TemporaryDirectory() as d:
            qcompiler.export_checkpoint(m, d, recipe=W4_GPTQ, tokenizer=tok)
            size = sum(p.stat().st_size for p in pathlib.Path(d).glob("*.safetensors"))
            loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            with torch.no_grad():
                theirs = zoo.perplexity(loaded, held)
        row("W4A16 sym g64, QAT from GPTQ, compressed-tensors checkpoint in transformers", theirs)
        notes.append(f"the checkpoint ({size / 2**20:.1f} MiB of safetensors) in transformers: perplexity "
                     f"{theirs:.4f} against qcompile's {ours:.4f} (differ {100 * (theirs / ours - 1):+.4f}%)")
    if "w8a8" in groups:
        row("W8A8 (dynamic per token, post-training)", compiled_perplexity(model, W8A8, held))
        trained("W8A8, QAT", W8A8, args.w8a8_steps)

    header = ("model", "held-out ppl", "vs FP32", "QAT steps", "training min", "peak memory (training)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    body = "\n".join(lines) + (
        f"\n\nSmolLM2-135M (bundled), {args.windows} held-out windows of 512 tokens; QAT: batch 4 x 256 tokens, "
        f"AdamW lr {args.lr:g} (weights), {args.scale_lr or args.lr:g} (scales), 5% warm-up then cosine; matmuls "
        f"{'in ' + args.autocast + ' (torch.autocast; fake quantization, weights, scales and loss float32)' if autocast else 'in float32'}; "
        f"the model's own float weights teach (KL on the next-token distribution); {torch.get_num_threads()} CPU "
        f"threads.\n\n"
        + "\n".join(f"- {n}" for n in notes) + "\n")
    print(body)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "Quantization-aware training: SmolLM2-135M", body)


if __name__ == "__main__":
    main()
