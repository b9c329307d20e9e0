"""docs/results/gpu_speed.md from the folders ``benchmarks/gpu_suite.sh`` wrote on a GPU machine.

Each folder is one run of the suite: its ``suite.log`` (machine, steps and how each ended), the
GEMM table (``gpu_gemm.txt``, else what ``gemm.log`` printed before a time limit), the end-to-end
rows (``gpu_e2e.txt``, else the rows and chosen kernels ``e2e.log`` printed) and the attention
tables. The page gets one section per run, stamped with the commit that ran (the GPU machine gets
a copy of the tree without git, so the commit is given here), the run's date and machine, and the
command; a step cut by its time limit is said to be cut.

    python benchmarks/gpu_results_page.py RUN_DIR [RUN_DIR ...] --commit HASH --date YYYY-MM-DD [per run] \
        [--command "bash benchmarks/gpu_suite.sh --quick" ...] [--note "..." ...] [--page docs/results/gpu_speed.md]
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def _read(folder: str, *names: str) -> str:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                return f.read()
    return ""


def _e2e_rows(log: str) -> str:
    keep = [line for line in log.splitlines()
            if re.match(r"^(bf16|qcompile) .*\d", line) or line.startswith(("  graph ", "  runs on ", "row "))]
    return "\n".join(keep)


def section(folder: str, commit: str, date: str, command: str, note: str) -> str:
    suite = _read(folder, "suite.log")
    lines = suite.splitlines()
    machine = lines[0] if lines else "unknown machine"
    steps = [line for line in lines if re.match(r"== \w+: exit", line)]
    out = [f"## Run of {date}", "",
           f"commit `{commit}` · {date} · {machine} · `{command}`", ""]
    if note:
        out += [note, ""]
    out += ["Steps: " + "; ".join(s.replace("== ", "") + (" (cut by its time limit)" if "exit 124" in s else "")
                                    for s in steps), ""]
    gemm = _read(folder, "gpu_gemm.txt") or _read(folder, "gemm.log")
    if gemm:
        out += ["### Each kernel against bf16 cuBLAS (`benchmarks/gpu_gemm.py`)", "", "```", gemm.strip(), "```", ""]
    e2e = _read(folder, "gpu_e2e.txt") or _e2e_rows(_read(folder, "e2e.log"))
    if e2e:
        out += ["### 8 Llama-7B layers, decode and prefill (`benchmarks/gpu_e2e.py`)", "",
                "Columns: row, decode tok/s, [GPU busy ms per decode step, where the run measured it,] prefill "
                "ms, logit relative error, top-1 agreement, quantized linears (the table form adds the ratios "
                "over the best bf16 row). qcompile rows compare with "
                "qcompile's reference target on the same quantized weights; the indented lines are the "
                "kernels the triton target measured and kept.", "", "```", e2e.strip(), "```", ""]
    attention = _read(folder, "gpu_attention.txt")
    if attention:
        out += ["### Attention (`benchmarks/gpu_attention.py`)", "", attention.strip(), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--commit", action="append", required=True, help="one per run, in order")
    ap.add_argument("--date", action="append", required=True, help="one per run, in order")
    ap.add_argument("--command", action="append", default=[], help="one per run, in order (default: the suite)")
    ap.add_argument("--note", action="append", default=[], help="one per run, in order")
    ap.add_argument("--page", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   "docs", "results", "gpu_speed.md"))
    args = ap.parse_args(argv)
    notes = args.note + [""] * (len(args.runs) - len(args.note))
    commands = args.command + ["bash benchmarks/gpu_suite.sh"] * (len(args.runs) - len(args.command))
    if len(args.commit) != len(args.runs) or len(args.date) != len(args.runs):
        ap.error("give one --commit and one --date per run")
    body = "\n\n".join(section(r, commit, date, c, n)
                        for r, commit, date, c, n in zip(args.runs, args.commit, args.date, commands, notes))
    os.makedirs(os.path.dirname(os.path.abspath(args.page)), exist_ok=True)
    with open(args.page, "w") as f:
        f.write("# GPU speed: every linear kernel against bf16, and 8 Llama-7B layers end to end\n\n"
                "Ratios above 1 are faster than bf16. Written by `benchmarks/gpu_results_page.py` from the "
                "folders `benchmarks/gpu_suite.sh` wrote on the GPU machine.\n\n" + body.rstrip() + "\n")
    print(f"wrote {args.page}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
