"""Every Triton kernel, in every launch variant, compiled for the H100 (sm_90) on any machine.

``CASES`` maps a case id to a function that compiles one kernel variant down to a cubin with
``triton.compile`` and the target named (no GPU needed). Run as a script, it compiles the cases
and prints one JSON object, case id -> "ok" or the error. It must run without
``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` gives Python functions that Triton's
compiler cannot take), which is why tests/unit/test_triton_compile.py runs it in a subprocess.
"""
import itertools
import json
import sys

H100 = ("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # 227 KB: the most shared memory one block may take on sm_90
ACT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def compile_for_h100(kernel, types: dict, constexprs: dict, num_warps=4, num_stages=3, aligned=()):
    """``kernel`` (a JIT function or an autotuned one) -> the compiled kernel; ``types`` give the
    runtime arguments' Triton types, ``constexprs`` the values of the rest; ``aligned`` names the
    arguments to compile as multiples of 16 (what Triton's launcher specializes when a call's
    pointer or integer is one: Llama's sizes, torch's allocations)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):  # an autotuner (or heuristics) wraps the JIT function
        fn = fn.fn
    names = fn.arg_names
    missing = set(names) - set(types) - set(constexprs)
    if missing:
        raise ValueError(f"no type or value for {sorted(missing)}")
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs={(names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    compiled = triton.compile(src, target=GPUTarget(*H100), options={"num_warps": num_warps, "num_stages": num_stages})
    if "cubin" not in compiled.asm:
        raise RuntimeError("no cubin")
    # what the interpreter cannot show: a launch that asks for more shared memory than a block
    # may have fails on the GPU, and registers spilled to local memory make a kernel slow
    if compiled.metadata.shared > H100_SHARED_BYTES:
        raise RuntimeError(f"needs {compiled.metadata.shared} bytes of shared memory; an sm_90 block has "
                           f"{H100_SHARED_BYTES}")
    usage = resource_usage(compiled.asm["cubin"])
    if usage["LOCAL"] > 0:
        raise RuntimeError(f"spills registers to local memory ({usage})")
    return compiled


def resource_usage(cubin: bytes) -> dict:
    """``cuobjdump -res-usage`` of a cubin (shipped in Triton's wheel): {"REG": ..., "LOCAL": ...}."""
    import os
    import subprocess
    import tempfile

    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise RuntimeError(f"cannot check register spills: {tool} is missing from this Triton install")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(l for l in text.splitlines() if "REG:" in l)
    return {k: int(v) for k, v in (field.split(":") for field in line.split() if field.split(":")[-1].isdigit())}


def _ints(*names):
    return {n: "i32" for n in names}


def _config_id(c) -> str:
    return f"{c.kwargs.get('BLOCK_M', 1)}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}w{c.num_warps}s{c.num_stages}"


def _quantize(act, is_fp8, has_smooth, one_tile):
    from qcompiler.runtimes import triton_quantize as tq

    q = "*u8" if is_fp8 else "*i8"
    compile_for_h100(tq._per_token_kernel,
                     {"x_ptr": ACT[act], "smooth_ptr": "*fp32", "q_ptr": q, "scale_ptr": "*fp32", "qmax": "fp32",
                      **_ints("K", "stride_x", "stride_q")},
                     {"HAS_SMOOTH": has_smooth, "IS_FP8": is_fp8, "BLOCK_K": 1024 if one_tile else 4096,
                      "ONE_TILE": one_tile}, num_warps=8)
    if one_tile:  # the per-tensor kernel has no one-tile form: once per flag set is enough
        compile_for_h100(tq._per_tensor_kernel,
                         {"x_ptr": ACT[act], "smooth_ptr": "*fp32", "scale_ptr": "*fp32", "q_ptr": q,
                          **_ints("K", "stride_x", "stride_q")},
                         {"HAS_SMOOTH": has_smooth, "IS_FP8": is_fp8, "BLOCK_K": 1024})


def _w8a8(config, is_fp8, out):
    from qcompiler.runtimes import triton_w8a8 as tw

    byte = "*u8" if is_fp8 else "*i8"
    compile_for_h100(tw._w8a8_kernel,
                     {"x_ptr": byte, "w_ptr": byte, "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": ACT[out],
                      "y_ptr": ACT[out], **_ints("M", "N", "K", "M_BUCKET", "stride_xm", "stride_wn", "stride_ym", "stride_xs")},
                     {"IS_FP8": is_fp8, "HAS_BIAS": True, **config.kwargs}, config.num_warps, config.num_stages)


def _weight_only(kernel: str, config, act, bits, has_zero, has_smooth, group=64, split_k=1):
    """kernel: 'gemv' (tensor cores, M <= 16), 'gemv1' (M = 1) or 'dequant' (the prefill path's)."""
    from qcompiler.runtimes import triton_weight_only as wo

    group = group if bits == 4 else 1 << 30
    w = "*u8" if bits == 4 else "*i8"
    if kernel == "dequant":
        bn, bk = config
        compile_for_h100(wo._dequant_kernel, {"w_ptr": w, "s_ptr": "*fp32", "z_ptr": "*u8", "out_ptr": ACT[act],
                                              **_ints("N", "K", "stride_wn", "stride_sn", "stride_zn", "stride_on")},
                         {"BITS": bits, "HAS_ZERO": has_zero, "GROUP_SIZE": group, "BLOCK_N": bn, "BLOCK_K": bk})
        return
    types = {"x_ptr": ACT[act], "y_ptr": ACT[act], "w_ptr": w, "s_ptr": "*fp32", "acc_ptr": "*fp32",
             "z_ptr": "*u8", "smooth_ptr": ACT[act], "bias_ptr": ACT[act],
             **_ints("M", "N", "K", "K_W", "M_BUCKET", "stride_xm", "stride_wn", "stride_sn", "stride_zn", "stride_ym")}
    constexprs = {"BITS": bits, "HAS_ZERO": has_zero, "HAS_SMOOTH": has_smooth, "HAS_BIAS": True,
                  "GROUP_SIZE": group, "SPLIT_K": split_k, **config.kwargs}
    if kernel == "gemv":
        constexprs.update(PRECISION="ieee" if act == "fp32" else "tf32", UPCAST=False)
    fn = wo._gemv_kernel if kernel == "gemv" else wo._gemv1_kernel
    names = fn.fn.arg_names
    compile_for_h100(fn, {k: v for k, v in types.items() if k in names}, constexprs, config.num_warps, config.num_stages)


def _packed(kernel: str, config, act, bits, has_zero, has_smooth, group=64):
    """kernel: 'gemv' (M = 1) or 'gemm' of runtimes/triton_packed.py, on int32 words."""
    from qcompiler.runtimes import triton_packed as tp

    types = {"x_ptr": ACT[act], "y_ptr": ACT[act], "w_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32",
             "smooth_ptr": ACT[act], "bias_ptr": ACT[act],
             **_ints("M", "N", "K", "K_W", "M_BUCKET", "stride_xm", "stride_ym", "one_bits")}
    constexprs = {"BITS": bits, "HAS_ZERO": has_zero, "HAS_SMOOTH": has_smooth, "HAS_BIAS": True,
                  "GROUP_SIZE": group if bits == 4 else 1 << 30, **config.kwargs}
    if kernel == "gemm":
        constexprs.update(PRECISION="ieee" if act == "fp32" else "tf32", UPCAST=False)
    fn = tp._gemm_packed_kernel if kernel == "gemm" else tp._gemv_packed_kernel
    names = fn.fn.arg_names
    compile_for_h100(fn, {k: v for k, v in types.items() if k in names}, constexprs, config.num_warps, config.num_stages)


def _norm_quantize(act, k, is_fp8, smooth):
    """The RMS norm fused into the per-token quantize, launched as its launcher does."""
    from qcompiler.runtimes import triton_norm_quantize as tnq

    block = 1 << (k - 1).bit_length()
    compile_for_h100(tnq._norm_quantize_kernel,
                     {"h_ptr": ACT[act], "w_ptr": ACT[act], "smooth_ptr": "*fp32", "q_ptr": "*u8" if is_fp8 else "*i8",
                      "scale_ptr": "*fp32", "eps": "fp32", "qmax": "fp32", **_ints("K", "stride_h", "stride_q")},
                     {"HAS_SMOOTH": smooth, "IS_FP8": is_fp8, "ROUND_BF16": False, "BLOCK_K": block},
                     num_warps=8 if block >= 4096 else 4)


def _attention_operands(act, d, is_fp8):
    """The 8-bit attention's one-launch operand quantization, launched as its launcher does."""
    from qcompiler.runtimes import triton_attention_operands as tao

    block_d = max(16, 1 << (d - 1).bit_length())
    compile_for_h100(tao._operands_kernel,
                     {"q_ptr": ACT[act], "k_ptr": ACT[act], "v_ptr": ACT[act], "qq_ptr": "*i8", "kq_ptr": "*i8",
                      "vq_ptr": "*u8" if is_fp8 else "*i8", "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
                      "qk_max": "fp32", "v_max": "fp32",
                      **_ints("LQ", "LK", "HQ", "HKV", "sqb", "sqh", "sqn", "skb", "skh", "skn", "svb", "svh", "svn",
                              "q_heads", "kv_heads", "q_blocks", "k_blocks", "v_blocks")},
                     {"D": d, "BLOCK_T": max(1, min(64, 8192 // block_d)), "BLOCK_D": block_d, "ROWS": tao.TOKEN_ROWS,
                      "CHANNELS": tao.VALUE_CHANNELS, "V_FP8": is_fp8})


def _attention(is_fp8, mask, causal, block_m, block_n, d, out, aligned=False):
    """``aligned``: pointers and strides compiled as multiples of 16, as a launch with a head size
    of 64 or 128 specializes them."""
    from qcompiler.runtimes import triton_attention as ta

    types = {"q_ptr": "*i8", "k_ptr": "*i8", "v_ptr": "*u8" if is_fp8 else "*i8", "qs_ptr": "*fp32", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
             "mask_ptr": {ta.MASK_NONE: "*fp32", ta.MASK_BOOL: "*i8", ta.MASK_ADD: "*fp32"}[mask],
             "o_ptr": ACT[out], "sm_scale": "fp32",
             **_ints("LQ", "LK", "HQ", "HKV", "GROUP", "sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn",
                     "smb", "smh", "smm", "smn", "sob", "soh", "som")}
    warps = {16: 4, 64: 4, 128: 8}[block_m]  # as ta.query_tile_size launches each row tile
    return compile_for_h100(ta._attention_kernel, types, {
        "D": d, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": max(16, 1 << (d - 1).bit_length()),
        "IS_FP8": is_fp8, "QMAX": 448.0 if is_fp8 else 127.0, "MASK": mask, "CAUSAL": causal}, num_warps=warps,
        aligned=[k for k, v in types.items() if v.startswith("*") or (v == "i32" and k[0] == "s" and k not in ("smm", "smn"))]
        if aligned else ())


def _kv_split(fmt, act, mask, causal, block_m, d):
    """The split-KV decode kernel and its merge."""
    import triton.language as tl

    from qcompiler.runtimes import triton_attention as ta, triton_kv_attention as tk

    code = {"int8": "*i8", "fp8": "*u8", "int4": "*u8"}[fmt]
    block_d = max(16, 1 << (d - 1).bit_length())
    types = {"q_ptr": ACT[act], "kc_ptr": code, "ks_ptr": "*fp16", "ko_ptr": "*fp16", "kt_ptr": ACT[act],
             "vc_ptr": code, "vs_ptr": "*fp16", "vo_ptr": "*fp16", "vt_ptr": ACT[act],
             "mask_ptr": {ta.MASK_NONE: ACT[act], ta.MASK_BOOL: "*i8", ta.MASK_ADD: "*fp32"}[mask],
             "op_ptr": "*fp32", "mp_ptr": "*fp32", "lp_ptr": "*fp32", "o_ptr": ACT[act], "sm_scale": "fp32",
             **_ints("LQ", "LC", "LT", "HQ", "HKV", "GROUP", "K_GROUP", "V_GROUP", "CHUNK", "SPLITS", "sqb", "sqh",
                     "sqm", "sktb", "skth", "sktn", "svtb", "svth", "svtn", "smb", "smh", "smm", "smn", "sob", "soh",
                     "som")}
    for direct in (False, True):  # several slices and a merge; one slice writing the output
        compile_for_h100(tk._kv_split_kernel, types, {
            "D": d, "BLOCK_M": block_m, "BLOCK_N": 64 if d <= 64 else 32, "BLOCK_D": block_d,
            "FMT": tk.FORMAT_CODES[fmt], "HAS_OFFSET": fmt == "int4", "MASK": mask, "CAUSAL": causal,
            "DOT": {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[act], "DIRECT": direct})
    compile_for_h100(tk._kv_merge_kernel, {"op_ptr": "*fp32", "mp_ptr": "*fp32", "lp_ptr": "*fp32", "o_ptr": ACT[act],
                                           **_ints("HQ", "LQ", "SPLITS", "sob", "soh", "som")},
                     {"D": d, "BLOCK_S": 64, "BLOCK_D": block_d})


def _kv_attention(fmt, act, mask, causal, block_m, d):
    import triton.language as tl

    from qcompiler.runtimes import triton_attention as ta, triton_kv_attention as tk

    code = {"int8": "*i8", "fp8": "*u8", "int4": "*u8"}[fmt]
    types = {"q_ptr": ACT[act], "kc_ptr": code, "ks_ptr": "*fp16", "ko_ptr": "*fp16", "kt_ptr": ACT[act],
             "vc_ptr": code, "vs_ptr": "*fp16", "vo_ptr": "*fp16", "vt_ptr": ACT[act],
             "mask_ptr": {ta.MASK_NONE: ACT[act], ta.MASK_BOOL: "*i8", ta.MASK_ADD: "*fp32"}[mask],
             "o_ptr": ACT[act], "sm_scale": "fp32",
             **_ints("LQ", "LC", "LT", "HQ", "HKV", "GROUP", "K_GROUP", "V_GROUP", "sqb", "sqh", "sqm", "sktb", "skth",
                     "sktn", "svtb", "svth", "svtn", "smb", "smh", "smm", "smn", "sob", "soh", "som")}
    compile_for_h100(tk._kv_attention_kernel, types, {
        "D": d, "BLOCK_M": block_m, "BLOCK_N": 64 if d <= 64 else 32, "BLOCK_D": max(16, 1 << (d - 1).bit_length()),
        "FMT": tk.FORMAT_CODES[fmt], "HAS_OFFSET": fmt == "int4", "MASK": mask, "CAUSAL": causal,
        "DOT": {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[act]})


# activation dtype, bits, zero points, AWQ smoothing, group: the flag sets the launchers produce
# (group 16 scales in the tile; 128 is longer than some BLOCK_K)
WEIGHT_ONLY_VARIANTS = [("bf16", 4, False, False, 64), ("fp16", 4, True, True, 32), ("fp32", 4, True, False, 128),
                        ("bf16", 4, True, False, 16), ("bf16", 4, False, True, 16),
                        ("bf16", 8, False, False, 0), ("fp16", 8, False, False, 0)]


def cases() -> dict:
    """case id -> a no-argument function that compiles it (raises on failure)."""
    from qcompiler.runtimes import triton_tuning as tuning

    out = {}
    for act, is_fp8, smooth, one_tile in itertools.product(ACT, [False, True], [False, True], [False, True]):
        out[f"quantize-{act}-{'fp8' if is_fp8 else 'int8'}-{'smooth' if smooth else 'plain'}-"
            f"{'onetile' if one_tile else 'twopass'}"] = lambda a=(act, is_fp8, smooth, one_tile): _quantize(*a)
    for config, is_fp8 in itertools.product(tuning.ALL_W8A8_GEMV, [False, True]):  # the GEMV's configs
        out[f"w8a8-gemv-{'fp8' if is_fp8 else 'int8'}-{_config_id(config)}"] = lambda a=(config, is_fp8, "bf16"): _w8a8(*a)
    for config, is_fp8 in itertools.product(tuning.ALL_W8A8, [False, True]):
        out[f"w8a8-{'fp8' if is_fp8 else 'int8'}-{_config_id(config)}"] = lambda a=(config, is_fp8, "bf16"): _w8a8(*a)
    for out_dtype in ("fp16", "fp32"):
        out[f"w8a8-int8-out-{out_dtype}"] = lambda o=out_dtype: _w8a8(tuning.ALL_W8A8[0], False, o)
    for config, split in itertools.product(tuning.ALL_WEIGHT_ONLY_GEMV, [1, 4]):
        out[f"w4-gemv-split{split}-{_config_id(config)}"] = lambda a=(config, split): _weight_only(
            "gemv", a[0], "bf16", 4, False, False, 32, a[1])
    for config, split in itertools.product(tuning.ALL_WEIGHT_ONLY_GEMV1, [1, 4]):
        out[f"w4-gemv1-split{split}-{_config_id(config)}"] = lambda a=(config, split): _weight_only(
            "gemv1", a[0], "bf16", 4, True, False, 32, a[1])
    for act, bits, zero, smooth, group in WEIGHT_ONLY_VARIANTS:
        name = f"{act}-w{bits}-{'zero' if zero else 'sym'}-{'smooth' if smooth else 'plain'}" + (f"-g{group}" if group else "")
        out[f"dequant-{name}"] = lambda a=(act, bits, zero, smooth, group): _weight_only(
            "dequant", tuning.DEQUANT_BLOCK, *a)
        out[f"gemv-{name}"] = lambda a=(act, bits, zero, smooth, group): _weight_only(
            "gemv", tuning.ALL_WEIGHT_ONLY_GEMV[0], *a, 2)
        out[f"gemv1-{name}"] = lambda a=(act, bits, zero, smooth, group): _weight_only(
            "gemv1", tuning.ALL_WEIGHT_ONLY_GEMV1[0], *a, 2)
    for config in tuning.ALL_PACKED_GEMV:
        for bits, group in ((4, 32), (4, 128), (8, 0)):
            out[f"packed-gemv-w{bits}-g{group}-{_config_id(config)}"] = lambda a=(config, bits, group): _packed(
                "gemv", a[0], "bf16", a[1], a[1] == 4, False, a[2])
    for config in tuning.ALL_PACKED_GEMM:
        for bits, group in ((4, 32), (4, 128)):
            out[f"packed-gemm-w{bits}-g{group}-{_config_id(config)}"] = lambda a=(config, bits, group): _packed(
                "gemm", a[0], "bf16", a[1], a[1] == 4, False, a[2])
    for act, bits, zero, smooth, group in WEIGHT_ONLY_VARIANTS:
        if bits == 4 and group < 8:
            continue
        name = f"{act}-w{bits}-{'zero' if zero else 'sym'}-{'smooth' if smooth else 'plain'}" + (f"-g{group}" if group else "")
        out[f"packed-gemv-{name}"] = lambda a=(act, bits, zero, smooth, group): _packed("gemv", tuning.ALL_PACKED_GEMV[0], *a)
        if bits == 4:
            out[f"packed-gemm-{name}"] = lambda a=(act, bits, zero, smooth, group): _packed(
                "gemm", tuning.ALL_PACKED_GEMM[0], *a)
    for is_fp8, mask, causal, (bm, bn), d in itertools.product(
            [False, True], [0, 1, 2], [False, True], [(16, 64), (64, 64)], [64, 80]):
        if causal and mask == 2:
            continue  # the launcher's flag sets: a causal graph carries no additive mask in the cases here
        out[f"attention-{'fp8' if is_fp8 else 'int8'}-mask{mask}-{'causal' if causal else 'full'}-{bm}x{bn}-d{d}"] = (
            lambda a=(is_fp8, mask, causal, bm, bn, d, "bf16"): _attention(*a))
    for act, k, is_fp8, smooth in [("bf16", 4096, True, False), ("fp16", 576, False, True), ("fp32", 11008, False, False),
                                   ("bf16", 16384, False, True)]:
        out[f"norm-quantize-{act}-k{k}-{'fp8' if is_fp8 else 'int8'}{'-smooth' if smooth else ''}"] = (
            lambda a=(act, k, is_fp8, smooth): _norm_quantize(*a))
    for act, d, is_fp8 in [("bf16", 128, False), ("fp16", 64, True), ("fp32", 80, False), ("bf16", 24, True)]:
        out[f"attention-operands-{act}-d{d}-{'fp8' if is_fp8 else 'int8'}"] = (
            lambda a=(act, d, is_fp8): _attention_operands(*a))
    for is_fp8, causal, d in itertools.product([False, True], [False, True], [64, 128]):  # long prompts' tiles
        out[f"attention-{'fp8' if is_fp8 else 'int8'}-mask0-{'causal' if causal else 'full'}-128x64-d{d}"] = (
            lambda a=(is_fp8, 0, causal, 128, 64, d, "bf16"): _attention(*a))
    masks = [(0, False), (1, False), (2, False), (0, True)]  # none, boolean, additive, causal
    for i, (fmt, act) in enumerate(itertools.product(["int8", "fp8", "int4"], ["bf16", "fp16", "fp32"])):
        mask, causal = masks[i % 4]  # each format and dtype once, each mask kind at least twice
        bm, d = ((16, 64), (64, 128))[i % 2]  # decode's and prefill's row tiles, over both key tile sizes
        out[f"kv-attention-{fmt}-{act}-mask{mask}-{'causal' if causal else 'full'}-m{bm}-d{d}"] = (
            lambda a=(fmt, act, mask, causal, bm, d): _kv_attention(*a))
        bm = (16, 64)[i % 2]  # one query row of a 4- or a 64-head group: the split kernel's row tiles
        out[f"kv-split-{fmt}-{act}-mask{mask}-{'causal' if causal else 'full'}-m{bm}-d{d}"] = (
            lambda a=(fmt, act, mask, causal, bm, d): _kv_split(*a))
    return out


def main(ids) -> dict:
    todo = cases()
    results = {}
    for case_id in ids or todo:
        try:
            todo[case_id]()
            results[case_id] = "ok"
        except Exception as e:  # noqa: BLE001 — every failure is reported, by case
            results[case_id] = f"{type(e).__name__}: {e}"[:2000]
    return results


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
