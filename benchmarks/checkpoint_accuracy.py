"""compressed-tensors checkpoints of SmolLM2-135M: does the folder transformers loads compute what
qcompile computes?

For each recipe the model is quantized by ``qcompiler.export_checkpoint`` (through the
compressed-tensors library) and loaded back with ``AutoModelForCausalLM.from_pretrained``; its
perplexity on held-out 512-token windows of the bundled Wikipedia text is compared with qcompile's
``reference`` target on the same model and recipe (accuracy guards off: the checkpoint has none).

Read the table: "qcompile" and "checkpoint" are the two perplexities, "differ" their relative
difference (the bar: 0.1%), "vs FP32" what the recipe costs, "folder" the checkpoint's safetensors.
Recipes with SmoothQuant / AWQ input scales are written with ``smooth_skip`` (the scales the
format cannot hold left out, in qcompile too); "every input scaled" is qcompile's perplexity
without it, what that restriction costs.

    python benchmarks/checkpoint_accuracy.py [--windows 4] [--gptq] [--awq] --markdown docs/results/checkpoint_accuracy.md
"""
from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import torch

import qcompiler
from qcompiler.bundled import zoo
from qcompiler.deploy.checkpoint import export_checkpoint

# SmolLM2's hidden size is 576: the format needs group sizes that divide every K (64 and 32 do, 128 not)
CASES = [
    {"recipe": "w8a16"},
    {"recipe": "w8a8"},
    {"recipe": "fp8"},
    {"recipe": "w4a16", "group_size": 64},
    {"recipe": "w4a16", "group_size": 32},
    {"recipe": "w4a16", "group_size": 64, "symmetric": False},
    {"recipe": "w4a16", "group_size": 32, "symmetric": False},
]
# attention's output projection: nothing in the format can absorb its input scale (GQA)
SMOOTH_SKIP = ["*.o_proj"]
CASES.append({"recipe": "w8a8-smoothquant-dynamic", "smooth_skip": SMOOTH_SKIP})
GPTQ = {"recipe": "w4a16-gptq", "group_size": 64}
AWQ = {"recipe": "w4a16-awq", "group_size": 64, "smooth_skip": SMOOTH_SKIP}
GUARDS_OFF = {"min_sqnr_db": None, "max_static_loss_db": None}


def label(options: dict) -> str:
    extra = ", ".join(f"{k}={v}" if k != "smooth_skip" else f"{k}=({', '.join(v)})"
                      for k, v in options.items() if k != "recipe")
    return options["recipe"] + (f" ({extra})" if extra else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="held-out 512-token windows")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (GPTQ)")
    ap.add_argument("--gptq", action="store_true", help="also w4a16-gptq g64 (minutes of calibration)")
    ap.add_argument("--awq", action="store_true", help="also w4a16-awq g64 (minutes of calibration, twice)")
    ap.add_argument("--markdown", help="write the table as a stamped results page here")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    calib, held = zoo.lm_windows(ids, 512, args.calib, args.windows)
    with torch.no_grad():
        base = zoo.perplexity(model, held)
    rows = []

    def qcompile_perplexity(options):
        torch._dynamo.reset()
        qcompiler.calibration.state.forget(model)
        recipe = qcompiler.recipes.resolve(options)
        if recipe.needs_calibration:
            qcompiler.calibrate(model, [w[None] for w in calib], recipe=options if recipe.rounds_weights else None,
                                progress=False)
        fast = torch.compile(model, backend="qcompile", options={**options, **GUARDS_OFF, "target": "reference"})
        with torch.no_grad():
            return zoo.perplexity(fast, held)

    for options in CASES + ([GPTQ] if args.gptq else []) + ([AWQ] if args.awq else []):
        scaled = "" if "smooth_skip" not in options else \
            f"{qcompile_perplexity({k: v for k, v in options.items() if k != 'smooth_skip'}):.4f}"
        ours = qcompile_perplexity(options)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            export_checkpoint(model, d, recipe=options, tokenizer=tok)
            seconds = time.perf_counter() - t
            size = sum(p.stat().st_size for p in pathlib.Path(d).glob("*.safetensors"))
            try:
                loaded = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
            except Exception as e:  # reported in the table, not hidden: the row says why
                loaded, why = None, f"transformers cannot load it: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if loaded is not None:
                with torch.no_grad():
                    theirs = zoo.perplexity(loaded, held)
        if loaded is None:
            rows.append((label(options), f"{ours:.4f}", why, "", f"{100 * (ours / base - 1):+.2f}%", scaled,
                         f"{size / 2**20:.1f} MiB", f"{seconds:.1f}"))
        else:
            rows.append((label(options), f"{ours:.4f}", f"{theirs:.4f}", f"{100 * (theirs / ours - 1):+.4f}%",
                         f"{100 * (ours / base - 1):+.2f}%", scaled, f"{size / 2**20:.1f} MiB", f"{seconds:.1f}"))
        print(" | ".join(rows[-1]), flush=True)
    header = ("recipe", "qcompile (reference target)", "checkpoint in transformers", "differ", "vs FP32",
              "qcompile, every input scaled", "folder", "export s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    body = "\n".join(lines) + (f"\n\nFP32 perplexity {base:.4f}; {args.windows} held-out windows of 512 tokens; "
                               f"SmolLM2-135M (bundled), loaded back with transformers on the CPU.\n")
    print(body)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "compressed-tensors checkpoints: transformers against qcompile", body)


if __name__ == "__main__":
    main()
