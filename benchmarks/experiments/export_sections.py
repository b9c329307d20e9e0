"""Where ``qcompiler.export_onnx`` of SmolLM2-135M spends its time, step by step.

``qcompiler.export_onnx(model, example, path, recipe=..., form=..., calibration=...)`` as the
README writes it (8 calibration windows of 512 tokens, an example of 2 x 16 tokens), once with
the default dynamic batch and sequence and once with static sizes, each in a process of its own.
Timers wrapped around the steps it calls:

* calibration (``qcompiler.calibrate``);
* ``torch.export.export``: the model's own trace, then the exporter's trace of the q-op graph;
* qcompile's passes;
* the exporter's decompositions (``run_decompositions`` with its ONNX table: a third trace, run
  only where ``lowering.onnx_translate`` finds an op that needs it) and its type-promotion pass
  (with ``lowering.onnx_type_promotion``'s check of whether any node needs a cast);
* the translation of the traced graph into ONNX (with the build of the exporter's registry);
* qcompile's ONNX optimizer and fusions (``lowering.onnx_fusions.optimize``);
* the serialization of the optimized graph and the write of the file;
* the ONNX check and ONNX Runtime load of the written file.

"export" is the whole call less the calibration; "other" is what no timer covers. Each size runs
``--repeats`` times, each run in a process of its own; the page gives every run's export time and
the median of each column.

    python benchmarks/experiments/export_sections.py [--recipe w8a8] [--form ort] [--repeats 3] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_page import write_page  # noqa: E402

from decode_step_split import timed  # noqa: E402

STEPS = [  # (module, function, label)
    ("qcompiler.deploy.export_onnx", "calibrate", "calibration"),
    ("torch.export", "export", "torch.export (2 traces)"),
    ("qcompiler.passes.pipeline", "run_passes", "passes"),
    ("torch.onnx._internal.exporter._fx_passes", "decompose_with_registry", "decompositions"),
    ("qcompiler.lowering.onnx_type_promotion", "promote_types", "type promotion"),
    ("torch.onnx._internal.exporter._fx_passes", "insert_type_promotion_nodes", "type promotion"),
    ("torch.onnx._internal.exporter._core", "_exported_program_to_onnx_program", "translation"),
    ("qcompiler.lowering.onnx_translate", "registry_for", "translation"),
    ("qcompiler.lowering.onnx_fusions", "optimize", "ONNX optimizer"),
    ("qcompiler.lowering.onnx", "proto_of", "serialization and write"),
    ("onnx", "save_model", "serialization and write"),
    ("qcompiler.deploy.export_onnx", "_validate", "check and load"),
]


def _outermost(times: dict, active: set, label: str, fn):
    inner = timed(times, label, fn)

    def wrapper(*args, **kwargs):
        if label in active:
            return fn(*args, **kwargs)
        active.add(label)
        try:
            return inner(*args, **kwargs)
        finally:
            active.discard(label)
    return wrapper


def measure(recipe: str, form: str, static: bool) -> dict:
    import torch

    import qcompiler
    from qcompiler.bundled import zoo

    times = {label: 0.0 for _, _, label in STEPS}
    active = set()  # a step called inside another step of its label counts once
    for module, name, label in STEPS:
        owner = importlib.import_module(module)
        setattr(owner, name, _outermost(times, active, label, getattr(owner, name)))
    torch.manual_seed(0)
    model, tok = zoo.load_smollm2()
    cal, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 512, 8, 4)
    example = {"input_ids": held[:2, :16], "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    shapes = {"input_ids": {}, "attention_mask": {}, "use_cache": None} if static else None
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        qcompiler.export_onnx(model, example, os.path.join(tmp, "model.onnx"), recipe=recipe, form=form,
                              calibration=cal.split(1), dynamic_shapes=shapes)
        total = time.perf_counter() - t
    times["export"] = total - times["calibration"]
    times["other"] = total - sum(times[label] for label in set(label for _, _, label in STEPS))
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="w8a8")
    p.add_argument("--form", default="ort")
    p.add_argument("--markdown")
    p.add_argument("--repeats", type=int, default=3, help="runs of each size (medians on the page)")
    p.add_argument("--child", choices=["dynamic", "static"])
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.recipe, args.form, args.child == "static")))
        return
    columns = ["export"] + list(dict.fromkeys(label for _, _, label in STEPS)) + ["other"]
    runs = {"dynamic": [], "static": []}
    for _ in range(args.repeats):  # each run in a process of its own, the two sizes alternated
        for sizes in runs:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", sizes, "--recipe",
                                  args.recipe, "--form", args.form], capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"{sizes}: {out.stderr[-2000:]}")
            runs[sizes].append(json.loads(lines[-1]))
            print(sizes, {c: round(runs[sizes][-1][c], 1) for c in columns}, flush=True)
    rows = []
    for sizes, found in runs.items():
        exports = sorted(r["export"] for r in found)
        cells = [f"{statistics.median(r[c] for r in found):.1f}" for c in columns]
        rows.append(f"| {sizes} | {' / '.join(f'{e:.1f}' for e in exports)} | " + " | ".join(cells) + " |")
    table = "\n".join(["| sizes | export s, each run | " + " | ".join(f"{c} s (median)" for c in columns) + " |",
                       "|" + "---|" * (len(columns) + 2), *rows])
    body = (__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip()
            + f"\n\nRecipe `{args.recipe}`, form `{args.form}`; {args.repeats} runs of each size, alternated.\n\n" + table)
    if args.markdown:
        write_page(args.markdown, "Where an ONNX export of SmolLM2-135M goes", body)


if __name__ == "__main__":
    main()
