"""Deployment size: SmolLM2-135M exported to ONNX, file bytes against the FP32 parameter bytes.

For each (form, recipe) the model is calibrated, exported with ``qcompiler.export_onnx`` with and
without ``embedding="int8"`` (the tied embedding / lm_head table stored once, INT8 per row), and
the file is checked (TensorRT form: the explicit-quantization checker) and loaded in ONNX Runtime,
which also computes the held-out perplexity of the file itself (512-token windows of the bundled
Wikipedia text, the same windows as ``benchmarks/accuracy.py`` uses first).

Read the table: "of FP32" is the file over the model's FP32 parameter bytes (a tied weight counted
once); "ppl" is the exported file's perplexity run in ONNX Runtime, against the FP32 model's.

    python benchmarks/export_size.py --markdown docs/results/export_size.md
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

from qcompiler.bundled import zoo
from qcompiler.runtimes.ort_session import OrtSession
import qcompiler

CASES = [  # (form, recipe, options)
    ("tensorrt", "w8a8-smoothquant", {}),
    ("tensorrt", "w8a8-smoothquant", {"embedding": "int8"}),
    ("ort", "w8a8", {}),
    ("ort", "w8a8", {"embedding": "int8"}),
]


def fp32_bytes(model) -> int:
    """Parameter bytes in float32, each tensor once (tied weights are one tensor)."""
    return 4 * sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def onnx_perplexity(path: str, windows: torch.Tensor) -> float:
    session = OrtSession(path)
    nll, count = 0.0, 0
    for w in windows:
        ids = w[None]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        logits = session(*[inputs[n] for n in session.input_names])[0].float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nll, count = nll + loss.item(), count + ids.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="held-out 512-token windows for the perplexity")
    ap.add_argument("--calib", type=int, default=8, help="calibration windows")
    ap.add_argument("--markdown", help="write the table as a stamped results page here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    cal, held = zoo.lm_windows(ids, 512, args.calib, args.windows)
    base_bytes = fp32_bytes(model)
    base_ppl = zoo.perplexity(model, held)
    print(f"SmolLM2-135M: FP32 parameters {base_bytes / 2**20:.1f} MiB, held-out ppl {base_ppl:.4f}", file=sys.stderr)
    example = {"input_ids": held[:2, :16], "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for form, recipe, options in CASES:
            t = time.perf_counter()
            path = os.path.join(tmp, "model.onnx")
            result = qcompiler.export_onnx(model, example, path, recipe=recipe, form=form,
                                           calibration=cal.split(1), options=options)
            seconds = time.perf_counter() - t
            ppl = onnx_perplexity(path, held)
            label = f"{recipe}" + (", embedding int8" if options.get("embedding") else "")
            check = "n/a" if form != "tensorrt" else ("clean" if not result.violations else f"{len(result.violations)} violations")
            rows.append((form, label, result.file_bytes, result.file_bytes / base_bytes, ppl, check, seconds))
            print(f"{form} | {label} | {result.file_bytes / 2**20:.1f} MiB | {100 * rows[-1][3]:.1f}% of FP32 | "
                  f"ppl {ppl:.4f} | check {check} | {seconds:.0f}s", file=sys.stderr)
            os.remove(path)
    head = ("| form | recipe | file | of FP32 | ppl (ONNX Runtime) | TensorRT check | export s |\n"
            "|---|---|---|---|---|---|---|\n")
    body = f"| FP32 model (PyTorch) | | {base_bytes / 2**20:.1f} MiB | 100% | {base_ppl:.4f} | | |\n" + "".join(
        f"| {f} | {l} | {b / 2**20:.1f} MiB | {100 * r:.1f}% | {p:.4f} | {c} | {s:.0f} |\n"
        for f, l, b, r, p, c, s in rows)
    print(head + body)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "Deployment size: SmolLM2-135M as ONNX",
                   __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2] + "\n\n"
                   + f"{len(held)} held-out windows x 512 tokens, {len(cal)} calibration windows.\n\n" + head + body)


if __name__ == "__main__":
    main()
