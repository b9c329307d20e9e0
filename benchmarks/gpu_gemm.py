"""Each Triton kernel against bf16 ``F.linear`` (cuBLAS) in the same run, activation quantization included.

The GEMM table: (K, N) in {(4096, 4096), (4096, 11008), (11008, 4096)} at M in {1, 16, 128, 2048};
rows per shape
  bf16 F.linear (cuBLAS)             the baseline every ratio divides
  int8 torch._int_mm + epilogue      quantize (ours) + _int_mm + a separate scale/bias pass
  w8a8 int8 triton                   quantize (ours) + our GEMM with the epilogue inside
  fp8 torch._scaled_mm               quantize (ours) + _scaled_mm rowwise (bf16 out)
  w8a8 fp8 triton                    quantize (ours) + our Triton GEMM
  w8a8 fp8 qcompile                  quantize (ours) + what the lowering runs (_scaled_mm where it fits)
  w8a16 triton | w4a16 g128 sym triton | w4a16 g32 asym triton
  w4a16 g128 dequant + cuBLAS        torch dequantization of the INT4 weight, then bf16 F.linear (M > 16:
                                     the alternative to our GEMM for prefill)
Each row is first checked against the q-op reference on the same operands (‖out − ref‖ / ‖ref‖),
then timed over enough weight copies to exceed L2 (an INT4 4096 x 11008 weight is 22 MB and would
otherwise be timed from cache), two ways, medians of ``triton.testing.do_bench``:
  graph  one CUDA graph running the row once per copy, replayed; time / copies. The kernels' own
         time, launch overhead excluded: what a model compiled with cuda_graphs=True sees.
         The ratio column divides these.
  eager  one Python call per timed run (launch overhead included, as in eager PyTorch).

    python benchmarks/gpu_gemm.py [--m 1,16,128,2048] [--shapes 4096x4096,...] [--out FILE]
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


def make_rows(m: int, k: int, n: int, device):
    """label -> (setup(copy index) -> operands, run(operands) -> y, reference(operands) -> y)."""
    from qcompiler.runtimes import triton_quantize as tq, triton_w8a8 as tw, triton_weight_only as wo

    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)

    def weight():
        return torch.randn(n, k, device=device) / k**0.5

    def w8(qdtype):
        def setup():
            wq, ws = ops.quantize_per_channel_ref(weight(), qdtype)
            return wq, ws
        return setup

    def int_mm(wq, ws):
        xq, xs = tq.quantize_per_token(x)
        acc = torch._int_mm(xq, wq.t())
        return (acc.float() * xs * ws + bias.float()).to(torch.bfloat16)

    def scaled_mm(wq, ws):
        xq, xs = tq.quantize_per_token(x, None, ops.FP8)
        return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws[None, :], bias=bias, out_dtype=torch.bfloat16)

    def w8a8(qdtype, linear=tw.linear_w8a8_triton):
        def run(wq, ws):
            xq, xs = tq.quantize_per_token(x, None, qdtype)
            return linear(xq, xs, wq, ws, bias, torch.bfloat16)
        return run

    def w8a8_ref(qdtype):
        def ref(wq, ws):
            xq, xs = ops.quantize_per_token_ref(x, None, qdtype)
            return ops.linear_w8a8_ref(xq, xs, wq, ws, bias, torch.float32)
        return ref

    def w4(group, symmetric):
        def setup():
            p = int4.quantize(weight(), group, symmetric)
            return p.packed, p.scale, p.zero
        return setup

    def w4_run(group):
        return lambda packed, scale, zero: wo.linear_w4a16(x, packed, scale, zero, None, group, bias)

    def w4_ref(group):
        return lambda packed, scale, zero: ops.linear_w4a16_ref(x.float(), packed, scale, zero, None, group, bias.float())

    bf16 = lambda: (weight().to(torch.bfloat16),)  # noqa: E731
    rows = {
        "bf16 F.linear (cuBLAS)": (bf16, lambda w: F.linear(x, w, bias), lambda w: F.linear(x.float(), w.float(), bias.float())),
        "w8a8 int8 triton": (w8(torch.int8), w8a8(torch.int8), w8a8_ref(torch.int8)),
        "w8a8 fp8 triton": (w8(ops.FP8), w8a8(ops.FP8), w8a8_ref(ops.FP8)),
        "w8a8 fp8 qcompile": (w8(ops.FP8), w8a8(ops.FP8, tw.linear_w8a8), w8a8_ref(ops.FP8)),
        "w8a16 triton": (w8(torch.int8), lambda wq, ws: wo.linear_w8a16(x, wq, ws, bias),
                         lambda wq, ws: ops.linear_w8a16_ref(x.float(), wq, ws, bias.float())),
        "w4a16 g128 sym triton": (w4(128, True), w4_run(128), w4_ref(128)),
        "w4a16 g32 asym triton": (w4(32, False), w4_run(32), w4_ref(32)),
    }
    if device.type == "cuda":  # library peers: no CPU interpreter equivalent
        if m > 16:  # torch._int_mm needs M > 16
            rows["int8 torch._int_mm + epilogue"] = (w8(torch.int8), int_mm, w8a8_ref(torch.int8))
        rows["fp8 torch._scaled_mm rowwise"] = (w8(ops.FP8), scaled_mm, w8a8_ref(ops.FP8))
        if m > 16:
            rows["w4a16 g128 dequant + cuBLAS"] = (
                w4(128, True), lambda packed, scale, zero: F.linear(
                    x, int4.dequantize(packed, scale, zero, 128, k).to(torch.bfloat16), bias), w4_ref(128))
    return rows


def graph_us(run, copies) -> float:
    """Microseconds per call, from replays of one CUDA graph that calls ``run`` once per copy."""
    import triton.testing

    for c in copies:  # autotuning and first launches happen outside the capture
        run(*c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in copies:
            run(*c)
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
    return 1e3 * ms / len(copies)


def eager_us(run, copies) -> float:
    import triton.testing

    it = iter(range(10**9))
    return 1e3 * triton.testing.do_bench(lambda: run(*copies[next(it) % len(copies)]),
                                         warmup=25, rep=200, return_mode="median")


def nbytes(operands) -> int:
    return sum(t.numel() * t.element_size() for t in operands if isinstance(t, torch.Tensor))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    ap.add_argument("--out", default=None, help="also write the table here")
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
             f"torch {torch.__version__}", f"{'M':>5} {'K':>6} {'N':>6}  {'row':34} {'rel err':>9} {'graph us':>9} {'vs bf16':>8} {'eager us':>9} {'vs bf16':>8}"]
    failures = 0
    for k, n in shapes:
        for m in ms:
            rows = make_rows(m, k, n, device)
            base = None
            for label, (setup, run, reference) in rows.items():
                first = setup()
                err = rel(run(*first), reference(*first))
                bad = not err < 2e-2  # same quantized operands: only bf16 rounding (~4e-3) separates them
                failures += bad
                us = (float("nan"), float("nan"))
                if device.type == "cuda":
                    copies = [first] + [setup() for _ in range(max(1, 2 * L2_BYTES // max(nbytes(first), 1)))]
                    us = (graph_us(run, copies), eager_us(run, copies))
                    del copies
                base = us if base is None else base
                ratios = [b / u if u == u else float("nan") for b, u in zip(base, us)]
                lines.append(f"{m:>5} {k:>6} {n:>6}  {label:34} {err:9.2e} {us[0]:9.1f} {ratios[0]:7.2f}x "
                             f"{us[1]:9.1f} {ratios[1]:7.2f}x" + ("  WRONG" if bad else ""))
            print("\n".join(lines[-len(rows):]), flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
