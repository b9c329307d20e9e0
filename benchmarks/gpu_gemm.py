"""Every kernel each linear q-op can run on the GPU, against bf16 ``F.linear`` (cuBLAS), in one run.

The GEMM table: (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)} at M in {1, 16, 128, 2048}.
Rows per shape: the bf16 baseline, then one row per kernel of ``qcompiler.runtimes.linear_kernels``
that can run the call, for W8A8 INT8 and FP8, W8A16 and W4A16 (g128 symmetric, g32 asymmetric):
exactly the candidates the triton lowering measures. ``<- fastest`` marks each family's fastest
correct kernel (what the lowering keeps). W8A8 rows time the GEMM q-op alone; the activation
quantize before it is one more kernel per input (the end-to-end table includes it).

Each row is first checked against the q-op reference on the same operands (‖out − ref‖ / ‖ref‖),
then timed over enough weight copies to exceed L2 (an INT4 4096 x 11008 weight is 22 MB and would
otherwise be timed from cache): one CUDA graph running the row once per copy, replayed, median of
``triton.testing.do_bench``, time / copies. The kernels' own time, launch overhead excluded: what
a model compiled with cuda_graphs=True sees.

    python benchmarks/gpu_gemm.py [--m 1,16,128,2048] [--shapes 4096x4096,...] [--kinds w4a16,...] [--out FILE]
    TRITON_INTERPRET=1 python benchmarks/gpu_gemm.py --smoke   # CPU: checks every row, times nothing
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from qcompiler.ir import int4, ops

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
MS = [1, 16, 128, 2048]
L2_BYTES = 50 * 2**20  # H100


def rel(out, ref):
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / ref.norm()).item()


def make_rows(m: int, k: int, n: int, device, kinds):
    """label -> (setup() -> operands, run(operands) -> y, reference(operands) -> y, family label).

    One row per kernel of each q-op family (``qcompiler.runtimes.linear_kernels``) that can run
    this call, each weight configuration its own family label."""
    from qcompiler.runtimes import linear_kernels as lk, triton_quantize as tq

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)

    def weight():
        return torch.randn(n, k, device=device) / k**0.5

    def w8a8_args(qdtype):
        def setup():
            wq, ws = ops.quantize_per_channel_ref(weight(), qdtype)
            xq, xs = tq.quantize_per_token(x, None, qdtype)
            return (xq, xs, wq, ws, bias, torch.bfloat16)
        return setup

    def w8a16_args():
        wq, ws = ops.quantize_per_channel_ref(weight(), torch.int8)
        return (x, wq, ws, bias)

    def w4_args(group, symmetric):
        def setup():
            p = int4.quantize(weight(), group, symmetric)
            return (x, p.packed, p.scale, p.zero, None, group, bias)
        return setup

    families = {
        "w8a8 int8": (lk.W8A8, w8a8_args(torch.int8)),
        "w8a8 fp8": (lk.W8A8, w8a8_args(ops.FP8)),
        "w8a16": (lk.W8A16, w8a16_args),
        "w4a16 g128 sym": (lk.W4A16, w4_args(128, True)),
        "w4a16 g32 asym": (lk.W4A16, w4_args(32, False)),
    }
    bf16 = lambda: (weight().to(torch.bfloat16),)  # noqa: E731
    rows = {"bf16 F.linear (cuBLAS)": (bf16, lambda w: F.linear(x, w, bias),
                                       lambda w: F.linear(x.float(), w.float(), bias.float()), "bf16")}
    for fam_label, (family, setup) in families.items():
        if fam_label.split()[0] not in kinds:
            continue
        probe = setup()
        for kernel in family.kernels:
            if not kernel.can_run(probe, m)[0]:
                continue
            if kernel.prepare is None:
                run = (lambda kern: lambda *a: kern.run(a, ()))(kernel)
                setup_k = setup
            else:  # the prepared weight is made once per weight, as the lowering does, outside the timing
                def setup_k(setup=setup, kern=kernel):
                    a = setup()
                    return (*a, *kern.prepare(a))
                n_args = len(probe)
                run = (lambda kern, n_args: lambda *a: kern.run(a[:n_args], a[n_args:]))(kernel, n_args)
            ref = (lambda fam, n_args: lambda *a: fam.reference(*a[:n_args]))(family, len(probe))
            rows[f"{fam_label} {kernel.name}"] = (setup_k, run, ref, fam_label)
    return rows


def graph_us(run, copies, rep_ms: int = 40) -> float:
    """Microseconds per call, from replays of one CUDA graph that calls ``run`` once per copy."""
    import triton.testing

    for c in copies:  # autotuning and first launches happen outside the capture
        run(*c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            run(*c)
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=rep_ms, return_mode="median")
    return 1e3 * ms / len(copies)


def nbytes(operands) -> int:
    return sum(t.numel() * t.element_size() for t in operands if isinstance(t, torch.Tensor))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    ap.add_argument("--out", default=None, help="also write the table here")
    ap.add_argument("--kinds", default="w8a8,w8a16,w4a16", help="which q-op families to run")
    ap.add_argument("--rep-ms", type=int, default=40, help="do_bench's timing window per row")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the rows; speed needs a GPU")
        return 2
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1" and device.type == "cpu":
        print("--smoke on the CPU needs TRITON_INTERPRET=1 in the environment")
        return 2
    shapes = [(96, 80), (80, 48)] if args.smoke else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [1, 17] if args.smoke else [int(v) for v in args.m.split(",")]
    torch.manual_seed(0)
    lines = [f"# device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (interpreter, no timing)'}; "
             f"torch {torch.__version__}", f"{'M':>5} {'K':>6} {'N':>6}  {'row':38} {'rel err':>9} {'graph us':>9} {'vs bf16':>8}"]
    failures = 0
    for k, n in shapes:
        for m in ms:
            rows = make_rows(m, k, n, device, args.kinds.split(","))
            base, fastest, labels = None, {}, []
            first_line = len(lines)
            for label, (setup, run, reference, fam) in rows.items():
                first = setup()
                err = rel(run(*first), reference(*first))
                bad = not err < 2e-2  # same quantized operands: only bf16 rounding (~4e-3) separates them
                failures += bad
                us = float("nan")
                if device.type == "cuda":
                    copies = [first] + [setup() for _ in range(max(1, 2 * L2_BYTES // max(nbytes(first), 1)))]
                    us = graph_us(run, copies, args.rep_ms)
                    del copies
                base = us if base is None else base
                if not bad and us == us and us < fastest.get(fam, (float("inf"), ""))[0]:
                    fastest[fam] = (us, label)
                labels.append(label)
                lines.append(f"{m:>5} {k:>6} {n:>6}  {label:38} {err:9.2e} {us:9.1f} {base / us if us == us else float('nan'):7.2f}x"
                             + ("  WRONG" if bad else ""))
            kept = {label for _, label in fastest.values()}
            for i, label in enumerate(labels):  # each family's fastest kernel: what the lowering keeps
                if label in kept and label != labels[0]:
                    lines[first_line + i] += "  <- fastest"
            print("\n".join(lines[first_line:]), flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
