"""The 8-bit attention kernel compiled for the H100/H200 (sm_90) on a machine without a GPU: its key loop.

Per key tile the kernel runs two 8-bit tensor-core products (``Qq Kq^T``, ``Pq Vq``); everything
else it does per score (convert the integer product, scale it, mask, exponentiate, quantize P) and
per output element (convert ``Pq Vq``, rescale the accumulator) is ALU work the tensor cores wait
on. FlashAttention-style kernels are bound by it on Hopper, where a conversion (``I2F``, ``F2I``)
issues at 1/8 of the multiply-add rate and ``MUFU.EX2`` at 1/8 too (the CUDA programming guide's
throughput table; ``I2FP``, the integer-to-float form the compiler emits for the products, is not
in it and is counted apart). The kernel is compiled
(``tests/triton_compile_cases._attention``: Triton's own ptxas, no GPU) for a long prompt's launch
(128 query rows on 8 warps, 64-key tiles, head size 128, no mask; pointers and strides compiled as
multiples of 16, as Triton's launcher specializes them at that head size) and disassembled with the
``cuobjdump`` Triton ships. The kernel walks the keys in two loops: the bulk, tiles wholly in
range and before every row's causal limit (no bounds or causal test), then the edge (the last,
partial tile; for a causal tile, the tiles on its diagonal), where scores are masked. The table
counts the instructions of one pass of each loop by opcode, and per score (the tile's 128 x 64
scores over its 256 threads); a kernel with one loop shows it as the bulk.
Timing needs a GPU: benchmarks/gpu_attention.py.

    python benchmarks/experiments/sm90_attention_sass.py [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "experiments"))

OPCODES = ["IMMA", "HGMMA", "IGMMA", "QGMMA", "I2F", "I2FP", "F2I", "F2FP", "MUFU", "FMUL", "FFMA", "FADD", "FMNMX", "FSEL",
           "IADD3", "IMAD", "LOP3", "PRMT", "SHF", "ISETP", "FSETP", "SHFL", "LDS", "LDG"]
SLOW = ("I2F", "F2I", "MUFU")  # issue at 1/8 of the FFMA rate on sm_90


def _cases():
    """(label, compiled kernel, scores per thread per key tile)."""
    import triton_compile_cases as tc

    for is_fp8 in (False, True):
        for causal in (False, True):
            compiled = tc._attention(is_fp8, 0, causal, 128, 64, 128, "bf16", aligned=True)
            yield (f"{'FP8' if is_fp8 else 'INT8'} P V, {'causal' if causal else 'no mask'}", compiled, 128 * 64 / 256)


def _loops(sass: str) -> list:
    """[(name, instructions, opcode counts)] of the kernel's key loops: the two longest backward
    branches, in code order (bulk, then edge)."""
    import re

    from sm90_decode_kernels_sass import _mix

    lines = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16) for line in lines]
    spans = [(a - int(m.group(1), 16), int(m.group(1), 16), a) for line, a in zip(lines, addr)
             for m in [re.search(r"BRA 0x([0-9a-f]+)", line)] if m and int(m.group(1), 16) < a]
    loops = sorted(sorted(spans, reverse=True)[:2], key=lambda s: s[1])
    out = []
    for name, (_, start, end) in zip(("bulk", "edge") if len(loops) == 2 else ("bulk",), loops):
        body = "\n".join(line for line, a in zip(lines, addr) if start <= a <= end)
        out.append((name, body.count("\n") + 1, _mix(body)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table as a stamped results page")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton_compile_cases as tc
    from sm90_decode_kernels_sass import _sass

    lines = ["| kernel | loop | registers | shared bytes | spills | loop instructions | per score | "
             + " | ".join(OPCODES) + " | I2F + F2I + MUFU per score |",
             "|---|---|---|---|---|---|---|" + "---|" * len(OPCODES) + "---|"]
    for label, compiled, scores in _cases():
        usage = tc.resource_usage(compiled.asm["cubin"])
        for loop, n, mix in _loops(_sass(compiled.asm["cubin"])):
            slow = sum(mix[o] for o in SLOW)
            lines.append(f"| {label} | {loop} | {usage['REG']} | {compiled.metadata.shared} | {usage['LOCAL']} | {n} | "
                         f"{n / scores:.2f} | " + " | ".join(str(mix[o]) for o in OPCODES) + f" | {slow / scores:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "sm_90 instruction mix of the 8-bit attention kernel's key loop (compiled without a GPU)",
                   __doc__.split("\n\n")[1] + "\n\n" + table + "\n\nOpcode counts are of one pass of the key loop "
                   "as compiled (software-pipelined); compare rows, not absolute counts. No row here was timed.")


if __name__ == "__main__":
    main()
