"""The decode GEMV kernels compiled for the H100/H200 (sm_90) on a machine without a GPU: their instruction mix.

A GEMV at one row streams the weight once; on Hopper it is bound by its instructions per weight
element before memory bandwidth. Without a GPU the compiled code still shows what each kernel
asks of the SM: each kernel is compiled to a cubin (``tests/triton_compile_cases.compile_for_h100``,
Triton's own ptxas, with the pointers and the sizes compiled as multiples of 16, as Triton's
launcher specializes a call on 4096 x 11008) and disassembled with the ``cuobjdump`` Triton ships; the table counts the
instructions of the whole kernel by opcode (the loop body dominates), the registers and shared
memory per thread block, and local-memory spills. ``per FFMA`` is the number of other ALU
instructions (integer, conversion, logic, float add / multiply) per fused multiply-add: the work a
weight element costs besides its multiply-add. Timing needs a GPU: benchmarks/gpu_gemm.py.

    python benchmarks/experiments/sm90_decode_kernels_sass.py [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

OPCODES = ["LDG", "FFMA", "FMUL", "FADD", "IMAD", "SHF", "LOP3", "PRMT", "I2F", "F2F", "HMMA", "LDS", "SHFL"]
ALU = ["FMUL", "FADD", "IMAD", "SHF", "LOP3", "PRMT", "I2F", "F2F"]


def _sass(cubin: bytes) -> str:
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _mix(sass: str) -> collections.Counter:
    return collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9]+)", sass, re.M))


def _aligned(types: dict, *ints) -> list:
    """The arguments a launch on Llama-sized layers passes as multiples of 16 (Triton's launcher
    specializes on it): every pointer (torch's allocations) and the named sizes and strides."""
    return [k for k, v in types.items() if v.startswith("*")] + list(ints)


def _rows():
    """(kernel, variant, compiled kernel) for each decode GEMV the kernel choice can take at M = 1."""
    import triton_compile_cases as tc

    from qcompiler.runtimes import triton_packed as tp, triton_tuning as tuning, triton_w8a8 as tw
    from qcompiler.runtimes import triton_weight_only as wo

    act = {"x_ptr": "*bf16", "y_ptr": "*bf16", "smooth_ptr": "*bf16", "bias_ptr": "*bf16"}
    for bits, group in ((4, 128), (8, 1 << 30)):
        name = "w4a16 g128 asym" if bits == 4 else "w8a16"
        cfg = tuning.ALL_WEIGHT_ONLY_GEMV1[0]
        types = {**act, "w_ptr": "*u8" if bits == 4 else "*i8", "s_ptr": "*fp32", "acc_ptr": "*fp32", "z_ptr": "*u8",
                 **tc._ints("N", "K", "K_W", "M_BUCKET", "stride_wn", "stride_sn", "stride_zn")}
        names = wo._gemv1_kernel.fn.arg_names
        types = {k: v for k, v in types.items() if k in names}
        yield (f"{name} triton_gemv_unsplit", f"{cfg.kwargs} w{cfg.num_warps}", tc.compile_for_h100(
            wo._gemv1_kernel, types,
            dict(BITS=bits, HAS_ZERO=bits == 4, HAS_SMOOTH=False, HAS_BIAS=False, GROUP_SIZE=group, SPLIT_K=1,
                 **cfg.kwargs), cfg.num_warps, cfg.num_stages,
            aligned=_aligned(types, "N", "K", "K_W", "stride_wn", "stride_sn", "stride_zn")))
        for cfg in tuning.ALL_PACKED_GEMV:
            types = {**act, "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32",
                     **tc._ints("N", "K", "K_W", "M_BUCKET", "one_bits")}
            yield (f"{name} triton_packed_gemv", f"{cfg.kwargs} w{cfg.num_warps}", tc.compile_for_h100(
                tp._gemv_packed_kernel, types,
                dict(BITS=bits, HAS_ZERO=bits == 4, HAS_SMOOTH=False, HAS_BIAS=False, GROUP_SIZE=group, **cfg.kwargs),
                cfg.num_warps, cfg.num_stages, aligned=_aligned(types, "N", "K", "K_W")))
    for cfg in tuning.ALL_W8A8_GEMV:
        types = {"x_ptr": "*u8", "w_ptr": "*u8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*bf16",
                 "y_ptr": "*bf16", **tc._ints("M", "N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_ym",
                                               "stride_xs")}
        yield ("w8a8 fp8 triton_gemv", f"{cfg.kwargs} w{cfg.num_warps}", tc.compile_for_h100(
            tw._w8a8_gemv_kernel, types, dict(IS_FP8=True, HAS_BIAS=False, **cfg.kwargs), cfg.num_warps,
            cfg.num_stages, aligned=_aligned(types, "N", "K", "stride_xm", "stride_wn", "stride_ym")))


def _loop(sass: str) -> tuple:
    """(instructions, opcode counts) of the kernel's longest backward branch: its K loop."""
    lines = [l for l in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", l)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4})\*/", l).group(1), 16) for l in lines]
    spans = [(a - int(m.group(1), 16), int(m.group(1), 16), a)
             for l, a in zip(lines, addr) for m in [re.search(r"BRA 0x([0-9a-f]+)", l)] if m and int(m.group(1), 16) < a]
    _, start, end = max(spans)
    body = "\n".join(l for l, a in zip(lines, addr) if start <= a <= end)
    return body.count("\n") + 1, _mix(body)


def _gemm_rows():
    """(kernel, variant, compiled kernel, weight elements a thread dequantizes per K step) of the
    fused weight-only GEMMs (M > 1), 4096 x 11008-like sizes."""
    import triton_compile_cases as tc

    from qcompiler.runtimes import triton_packed as tp, triton_tuning as tuning, triton_weight_only as wo

    act = {"x_ptr": "*bf16", "y_ptr": "*bf16", "smooth_ptr": "*bf16", "bias_ptr": "*bf16"}
    for bits, group in ((4, 128), (8, 1 << 30)):
        name = "w4a16 g128 asym" if bits == 4 else "w8a16"
        flags = dict(BITS=bits, HAS_ZERO=bits == 4, HAS_SMOOTH=False, HAS_BIAS=False, GROUP_SIZE=group,
                     PRECISION="tf32", UPCAST=False)
        for cfg in tuning.ALL_WEIGHT_ONLY_GEMM[:2]:
            types = {**act, "w_ptr": "*u8" if bits == 4 else "*i8", "s_ptr": "*fp32", "acc_ptr": "*fp32", "z_ptr": "*u8",
                     **tc._ints("M", "N", "K", "K_W", "M_BUCKET", "stride_xm", "stride_wn", "stride_sn", "stride_zn",
                                "stride_ym")}
            yield (f"{name} triton_gemm", f"{cfg.kwargs} w{cfg.num_warps}", tc.compile_for_h100(
                wo._gemm_kernel, types, dict(flags, SPLIT_K=1, **cfg.kwargs), cfg.num_warps, cfg.num_stages,
                aligned=_aligned(types, "N", "K", "K_W", "stride_xm", "stride_wn", "stride_sn", "stride_zn",
                                 "stride_ym")), cfg.kwargs["BLOCK_K"] * cfg.kwargs["BLOCK_N"] / (32 * cfg.num_warps))
        for cfg in tuning.ALL_PACKED_GEMM[:3] if bits == 4 else ():  # INT8 is not packed for the GEMM
            types = {**act, "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32",
                     **tc._ints("M", "N", "K", "K_W", "M_BUCKET", "stride_xm", "stride_ym", "one_bits")}
            yield (f"{name} triton_packed_gemm", f"{cfg.kwargs} w{cfg.num_warps}", tc.compile_for_h100(
                tp._gemm_packed_kernel, types, dict(flags, **cfg.kwargs), cfg.num_warps, cfg.num_stages,
                aligned=_aligned(types, "N", "K", "K_W", "stride_xm", "stride_ym")),
                cfg.kwargs["BLOCK_K"] * cfg.kwargs["BLOCK_N"] / (32 * cfg.num_warps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", help="write the table as a stamped results page")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton_compile_cases as tc

    lines = ["| kernel | config | registers | shared bytes | spills | " + " | ".join(OPCODES) + " | ALU per FFMA |",
             "|---|---|---|---|---|" + "---|" * len(OPCODES) + "---|"]
    for kernel, variant, compiled in _rows():
        mix = _mix(_sass(compiled.asm["cubin"]))
        usage = tc.resource_usage(compiled.asm["cubin"])
        alu = sum(mix[o] for o in ALU)
        per = f"{alu / mix['FFMA']:.1f}" if mix["FFMA"] else "-"
        lines.append(f"| {kernel} | `{variant}` | {usage['REG']} | {compiled.metadata.shared} | {usage['LOCAL']} | "
                     + " | ".join(str(mix[o]) for o in OPCODES) + f" | {per} |")
    gemm = ["| kernel | config | registers | shared bytes | spills | K-loop instructions | per weight element |",
            "|---|---|---|---|---|---|---|"]
    for kernel, variant, compiled, elements in _gemm_rows():
        usage = tc.resource_usage(compiled.asm["cubin"])
        n, _ = _loop(_sass(compiled.asm["cubin"]))
        gemm.append(f"| {kernel} | `{variant}` | {usage['REG']} | {compiled.metadata.shared} | {usage['LOCAL']} | {n} | "
                    f"{n / elements:.1f} |")
    table = "\n".join(lines) + "\n\nThe fused GEMMs (M > 1): the instructions of one K step of the loop per weight " \
        "element a thread dequantizes in it (tensor-core, load and address instructions included).\n\n" + "\n".join(gemm)
    print(table)
    if args.markdown:
        from results_page import write_page

        write_page(args.markdown, "sm_90 instruction mix of the one-row decode kernels (compiled without a GPU)",
                   __doc__.split("\n\n")[1] + "\n\n" + table + "\n\nOpcode counts are over the whole kernel "
                   "(prologue, pipelined loop, epilogue); the loop is unrolled by the compiler, so compare rows, "
                   "not absolute counts. No row here was timed.")


if __name__ == "__main__":
    main()
