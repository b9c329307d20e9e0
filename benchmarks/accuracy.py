"""Accuracy of every recipe on real models, side by side in one run (the main job).

SmolLM2-135M: perplexity on held-out Wikipedia text (512-token windows; calibration on a
disjoint earlier part of the text). all-MiniLM-L6-v2: mean cosine similarity of quantized vs FP32
sentence embeddings on held-out sentences. Every quantized row goes through
``torch.compile(model, backend="qcompile", options=...)``. Also reported: linear-weight bytes as
compiled (scales included) over FP32, and compile time (Dynamo + passes + searches + lowering);
calibration time is measured once per model and printed above each table.

    python benchmarks/accuracy.py            # full: 16 held-out windows (8,192 tokens)
    python benchmarks/accuracy.py --quick    # the main job (scripts/main.sh): fewer rows and windows
    python benchmarks/accuracy.py --llm-only --rows '[{"recipe": "w8a8-smoothquant", "clip": "auto"}]'
                                             # ablations: SmolLM2 rows for any option sets
    python benchmarks/accuracy.py --llm-only --select '^w8a16$|fp8|w4a16|^auto'
                                             # the INT4 / FP8 / auto rows only
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

from qcompiler.bundled import zoo
import qcompiler
import qcompiler.calibration.state

LLM_RECIPES = [  # (label, options)
    ("w8a16", {"recipe": "w8a16"}),
    ("w8a8", {"recipe": "w8a8"}),
    ("w8a8 quantize_tied (lm_head too)", {"recipe": "w8a8", "quantize_tied": True}),
    ("w8a8 + embedding int8 (tied lm_head reads it)", {"recipe": "w8a8", "embedding": "int8"}),
    ("w8a8-smoothquant-dynamic a=0.5", {"recipe": "w8a8-smoothquant-dynamic"}),
    ("w8a8-static (minmax)", {"recipe": "w8a8-static"}),
    ("w8a8-smoothquant a=0.5", {"recipe": "w8a8-smoothquant", "alpha": 0.5}),
    ("w8a8-smoothquant a=0.5 + embedding int8", {"recipe": "w8a8-smoothquant", "alpha": 0.5, "embedding": "int8"}),
    ("w8a8-smoothquant a=0.65", {"recipe": "w8a8-smoothquant", "alpha": 0.65}),
    ("w8a8-smoothquant a=0.8", {"recipe": "w8a8-smoothquant", "alpha": 0.8}),
    ("w8a8-smoothquant a=auto", {"recipe": "w8a8-smoothquant", "alpha": "auto"}),
    ("w8a8-smoothquant a=auto, no SQNR floor", {"recipe": "w8a8-smoothquant", "alpha": "auto", "min_sqnr_db": None}),
    ("fp8 (E4M3, dynamic per token)", {"recipe": "fp8"}),
    ("fp8-static (E4M3, per tensor)", {"recipe": "fp8-static"}),
    ("w4a16 RTN sym g128", {"recipe": "w4a16"}),
    ("w4a16 RTN sym g64", {"recipe": "w4a16", "group_size": 64}),
    ("w4a16 RTN sym g32", {"recipe": "w4a16", "group_size": 32}),
    ("w4a16 RTN asym g64", {"recipe": "w4a16", "group_size": 64, "symmetric": False}),
    ("w4a16-awq sym g64", {"recipe": "w4a16-awq", "group_size": 64}),
    ("w4a16-gptq sym g64 (act order)", {"recipe": "w4a16-gptq", "group_size": 64}),
    ("w4a16-gptq sym g64 (act order), no scale refit", {"recipe": "w4a16-gptq", "group_size": 64,
                                                        "refit_scales": False}),
    ("w4a16-gptq sym g64 (act order), first token unweighted", {"recipe": "w4a16-gptq", "group_size": 64,
                                                                "first_token_weight": 1.0}),
    ("w4a16-gptq sym g64, no act order", {"recipe": "w4a16-gptq", "group_size": 64, "act_order": False}),
    ("w4a16-awq-gptq sym g64", {"recipe": "w4a16-awq-gptq", "group_size": 64}),
    ("w4a16-awq sym g64 + scale tuning x4", {"recipe": "w4a16-awq", "group_size": 64, "tune_epochs": 4}),
    ("w4a16-gptq sym g64 (act order) + scale tuning x4", {"recipe": "w4a16-gptq", "group_size": 64,
                                                          "tune_epochs": 4}),
    ("auto, budget 2%", {"recipe": "auto", "budget": 0.02}),
]
NOTES = []  # calibration set sizes and times, printed under the table
QUICK_LLM = {"w8a16", "w8a8", "w8a8-smoothquant-dynamic a=0.5", "w8a8-smoothquant a=auto",
             "fp8 (E4M3, dynamic per token)", "w4a16 RTN sym g64"}
ENCODER_RECIPES = [
    ("w8a8", {"recipe": "w8a8"}),
    ("w8a16", {"recipe": "w8a16"}),
    ("w8a8-smoothquant-dynamic a=0.5", {"recipe": "w8a8-smoothquant-dynamic"}),
    ("w8a8-smoothquant a=auto", {"recipe": "w8a8-smoothquant", "alpha": "auto"}),
]


def compiled(model, options, target):
    torch._dynamo.reset()
    return torch.compile(model, backend="qcompile", options={**options, "target": target})


def weight_ratios(model) -> tuple:
    """(quantized linears / their FP32 bytes, all linear weights / their FP32 bytes,
    "kept in FP / all" linears)."""
    report = qcompiler.explain(model)
    linears = [r for r in report if r.op == "linear"]
    kept = sum(r.scheme == "floating point" for r in linears)
    weight_only = sum(r.weight_only for r in linears)
    return (*(q / fp32 if fp32 else float("nan")
              for fp32, q in (report.quantized_weight_bytes, report.weight_bytes)),
            f"{kept}/{len(linears)}" + (f" +{weight_only}w" if weight_only else ""))


def run_llm(args, rows):
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    cal, held = zoo.lm_windows(ids, args.window, args.calib, args.windows)
    base = zoo.perplexity(model, held)
    rows.append(("SmolLM2-135M", "fp32 (eager)", "ppl", base, 0.0, (1.0, 1.0, ""), 0.0))
    recipes = [(json.dumps(o, separators=(",", ":")), o) for o in args.rows] if args.rows else LLM_RECIPES
    recipes = [(l, o) for l, o in recipes if not (args.quick and not args.rows and l not in QUICK_LLM)]
    if args.select:
        recipes = [(l, o) for l, o in recipes if re.search(args.select, l)]
    # recipes that need no calibration are measured before any exists, as a user gets them
    # (with calibration statistics present, the SQNR floor would also apply to them)
    uncalibrated = [(l, o) for l, o in recipes if not _recipe(o).needs_calibration]
    for label, options in uncalibrated:
        llm_row(model, held, base, label, options, args, rows)
    t = time.perf_counter()
    with qcompiler.calibrate(model, cal.split(1), progress=False):
        pass
    NOTES.append(f"SmolLM2-135M: {len(held)} held-out windows x {args.window} tokens; calibration on "
                 f"{len(cal)} disjoint windows took {time.perf_counter() - t:.1f}s")
    print(NOTES[-1], file=sys.stderr)
    # algorithm recipes (AWQ, GPTQ, auto) calibrate for themselves, last: their block-wise run
    # replaces the statistics with ones seen through the quantized blocks before each layer
    algorithmic = [(l, o) for l, o in recipes if _recipe(o).rounds_weights]
    for label, options in recipes:
        if (label, options) not in uncalibrated and (label, options) not in algorithmic:
            llm_row(model, held, base, label, options, args, rows)
    cal_int4, _ = zoo.lm_windows(ids, args.window, args.calib_int4, args.windows)
    for label, options in algorithmic:
        t = time.perf_counter()
        qcompiler.calibrate(model, cal_int4.split(1), recipe=options, progress=False)
        run = dict(qcompiler.calibration.state.state_of(model).last_run)
        NOTES.append(f"SmolLM2-135M {label}: calibration ({run.get('algorithm')}, block by block, "
                     f"{len(cal_int4)} windows x {args.window} tokens) took {time.perf_counter() - t:.0f}s"
                     + (f" ({run['rounding_seconds']:.0f}s rounding, then scale tuning: calibration loss "
                        f"{run['tuning_loss'][0]:.4f} in the first epoch, {run['tuning_loss'][1]:.4f} in the last)"
                        if run.get("tuning_loss") else "")
                     + (f"; chose {run['formats']}, held-out calibration ppl x{run['ppl_ratio']:.4f} in "
                        f"{run['evaluations']} evaluations" if run.get("algorithm") == "auto" else ""))
        print(NOTES[-1], file=sys.stderr)
        llm_row(model, held, base, label, options, args, rows)


def _recipe(options):
    return qcompiler.get_recipe(options["recipe"]).replace(**{k: v for k, v in options.items() if k != "recipe"})


def llm_row(model, held, base, label, options, args, rows):
    print(f"measuring SmolLM2-135M {label} ...", file=sys.stderr, flush=True)
    fast = compiled(model, options, args.target)
    t = time.perf_counter()
    with torch.no_grad():
        fast(input_ids=held[:1], use_cache=False)
    compile_s = time.perf_counter() - t
    ppl = zoo.perplexity(fast, held)
    cal = "calibrated" if qcompiler.calibration.state.stats_for(model.model.layers[0].mlp.down_proj.weight) else "no calibration"
    rows.append(("SmolLM2-135M", f"{label} [{cal}]", "ppl", ppl, 100 * (ppl / base - 1), weight_ratios(model), compile_s))


def run_encoder(args, rows):
    model, tok = zoo.load_minilm()
    cal_s, held_s = zoo.wiki_sentences(args.sentences, args.sentences)

    def batches(sents):
        for i in range(0, len(sents), 32):
            yield dict(tok(sents[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))

    held_batches = list(batches(held_s))
    with torch.no_grad():
        ref = torch.cat([zoo.sentence_embeddings(model, b) for b in held_batches])
    rows.append(("all-MiniLM-L6-v2", "fp32 (eager)", "cosine", 1.0, 0.0, (1.0, 1.0, ""), 0.0))
    first = [(l, o) for l, o in ENCODER_RECIPES if not qcompiler.get_recipe(o["recipe"]).needs_calibration]
    for label, options in first:
        encoder_row(model, held_batches, ref, label + " [no calibration]", options, args, rows)
    t = time.perf_counter()
    with qcompiler.calibrate(model, list(batches(cal_s)), progress=False):
        pass
    NOTES.append(f"all-MiniLM-L6-v2: {len(held_s)} held-out sentences; calibration on {len(cal_s)} "
                 f"disjoint sentences took {time.perf_counter() - t:.1f}s")
    print(NOTES[-1], file=sys.stderr)
    for label, options in ENCODER_RECIPES:
        if (label, options) not in first:
            encoder_row(model, held_batches, ref, label + " [calibrated]", options, args, rows)


def encoder_row(model, held_batches, ref, label, options, args, rows):
    print(f"measuring all-MiniLM-L6-v2 {label} ...", file=sys.stderr, flush=True)
    fast = compiled(model, options, args.target)
    t = time.perf_counter()
    with torch.no_grad():
        fast(**held_batches[0])
    compile_s = time.perf_counter() - t
    with torch.no_grad():
        emb = torch.cat([zoo.sentence_embeddings(fast, b) for b in held_batches])
    cos = torch.nn.functional.cosine_similarity(emb, ref, dim=-1)
    rows.append(("all-MiniLM-L6-v2", label, "cosine", cos.mean().item(), cos.min().item(),
                 weight_ratios(model), compile_s))


HEADER = ("model", "recipe", "metric", "value", "vs fp32", "q-lin B", "all-lin B", "FP lin", "compile s")
LEGEND = ("cosine rows: 'vs fp32' is the minimum over sentences. 'q-lin B': bytes of the quantized linear "
          "weights, scales included, over their FP32 bytes; 'all-lin B': every linear weight as compiled, "
          "including those kept in floating point such as a tied lm_head, over FP32; 'FP lin': linears "
          "kept in floating point (tied weights, SQNR floor, static-scale guard) / all, '+Nw': N more whose "
          "activations a guard kept in floating point (INT8 weights); 'compile s': first call, Dynamo + "
          "passes + searches + lowering")


def cells(row) -> tuple:
    model, label, metric, value, delta, (q_ratio, all_ratio, kept), secs = row
    vs = f"{delta:+.2f}%" if metric == "ppl" else (f"min {delta:.4f}" if label != "fp32 (eager)" else "")
    return (model, label, metric, f"{value:.4f}", vs, f"{100 * q_ratio:.1f}%", f"{100 * all_ratio:.1f}%", kept,
            f"{secs:.1f}")


class Rows(list):
    """The table's rows; each is printed (flushed) the moment it is measured, so an interrupted run
    keeps what it measured, and the whole table is printed again at the end."""

    def append(self, row):
        if not self:
            print(" | ".join(HEADER), flush=True)
        super().append(row)
        print(" | ".join(cells(row)), flush=True)


def print_table(rows):
    table = [HEADER] + [cells(r) for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(HEADER))]
    print()
    for r in table:
        print("  ".join(str(c).rjust(w) if i >= 3 else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"({LEGEND})")
    for note in NOTES:
        print(note)


def markdown(rows) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n{LEGEND}.\n\n" + "\n".join(f"- {n}" for n in NOTES) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the main job: 4 SmolLM2 recipes, fewer windows")
    p.add_argument("--windows", type=int, help="held-out 512-token windows (default 16; quick 8)")
    p.add_argument("--calib", type=int, default=16, help="calibration windows")
    p.add_argument("--calib-int4", type=int, default=32,
                   help="calibration windows for the recipes that run an algorithm (AWQ, GPTQ, auto)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--sentences", type=int, default=256, help="MiniLM calibration / held-out sentences")
    p.add_argument("--target", default="reference", help="qcompile target for every row")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--markdown", help="also write the table as a stamped results page (docs/results/...)")
    p.add_argument("--rows", type=json.loads, help="JSON list of options dicts: SmolLM2 rows instead of the defaults")
    p.add_argument("--llm-only", action="store_true", help="skip all-MiniLM-L6-v2")
    p.add_argument("--select", help="only the SmolLM2 rows whose label matches this regex")
    args = p.parse_args(argv)
    args.windows = args.windows or (8 if args.quick else 16)
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = Rows()
    run_llm(args, rows)
    if not args.llm_only:
        run_encoder(args, rows)
    print_table(rows)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "Accuracy of every recipe on real models", markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
