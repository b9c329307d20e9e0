"""The INT8 GEMM kernels PyTorch offers on this CPU, against an FP32 GEMM, and their exactness.

Why the ``inductor`` target runs the integer product as a float32 GEMM: this prints, side by
side in one run (interleaved rounds, medians), FP32 ``F.linear`` vs ``torch._int_mm`` (s8 x s8),
oneDNN's ``qlinear_pointwise`` (u8 x s8, the x86 PT2E path) and ``aten._weight_int8pack_mm``
(weight-only), and whether each integer kernel is exact on full-range int8 data.

    python benchmarks/experiments/cpu_int8_kernels.py
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(1024, 384, 1536), (512, 576, 1536), (512, 1536, 576), (1, 576, 1536), (1, 576, 49152)]


def kernels(m, k, n):
    x = torch.randn(m, k)
    w = torch.randn(n, k)
    xs8 = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    xu8 = (xs8.int() + 128).to(torch.uint8)
    ws8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    wscale = torch.ones(n)
    packed = torch.ops.onednn.qlinear_prepack(ws8, (m, k))
    wzp = torch.zeros(n, dtype=torch.int64)
    exact = (xs8.long() @ ws8.long().t()).double()
    return {
        "fp32 F.linear": (lambda: F.linear(x, w), None),
        "torch._int_mm": (lambda: torch._int_mm(xs8, ws8.t()), exact),
        "onednn qlinear u8s8": (lambda: torch.ops.onednn.qlinear_pointwise(
            xu8, 1.0, 128, packed, wscale, wzp, None, 1.0, 0, torch.float32, "none", [], ""), exact),
        "_weight_int8pack_mm": (lambda: torch.ops.aten._weight_int8pack_mm(x, ws8, wscale), None),
    }


def main():
    torch.manual_seed(0)
    print(f"cpu={torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'M x K x N':18} {'kernel':22} {'median ms':>10} {'vs fp32':>8}  exact on full-range int8")
    for m, k, n in SHAPES:
        ks = kernels(m, k, n)
        for fn, _ in ks.values():
            fn()
        times = {name: [] for name in ks}
        for _ in range(5):
            for name, (fn, _) in ks.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["fp32 F.linear"])
        for name, (fn, exact) in ks.items():
            med = statistics.median(times[name])
            note = ""
            if exact is not None:
                err = (fn().double() - exact).abs().max().item()
                note = "yes" if err == 0 else f"NO: max error {err:.0f} of max |y| {exact.abs().max().item():.0f}"
            print(f"{f'{m}x{k}x{n}':18} {name:22} {1e3 * med:10.3f} {base / med:7.2f}x  {note}")
    print("('vs fp32': FP32 time / this time, >1 is faster)")


if __name__ == "__main__":
    main()
