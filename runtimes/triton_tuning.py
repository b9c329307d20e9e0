"""Launch configurations of the Triton kernels: small explicit sets, tuned once and cached on disk.

Each kernel family has one named function returning its candidate ``triton.Config`` list; the
autotuner keys on ``M_BUCKET`` (M rounded up to a power of two, so a new prompt length does not
re-tune), N and K, and ``cache_results=True`` keeps the winners in Triton's cache directory, so a
second process starts without benchmarking. Under the CPU interpreter only the first config of
each set is used (benchmarking there measures nothing).

The sets are written for Hopper (H100: 132 SMs, 228 KB shared memory per SM); the split-K choice
of the decode path is a named heuristic, because the launcher must know it before launching to
allocate the float32 accumulator.
"""
from __future__ import annotations

import triton

from qcompiler.runtimes.triton_support import interpreting

AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]
SMALL_M = 16          # at or below: the decode (GEMV-like) path
_M_BUCKETS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)


def m_bucket(m: int) -> int:
    for b in _M_BUCKETS:
        if m <= b:
            return b
    return _M_BUCKETS[-1]


def _cfg(bm, bn, bk, warps, stages, **extra):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, **extra}, num_warps=warps, num_stages=stages)


def _first_when_interpreting(configs: list) -> list:
    return configs[:1] if interpreting() else configs


# INT8 / FP8 x 8-bit GEMM with the scale epilogue; 8-bit operands want BLOCK_K >= 64
ALL_W8A8 = [
    _cfg(16, 64, 64, 4, 3, GROUP_M=8),
    _cfg(16, 128, 128, 4, 4, GROUP_M=8),
    _cfg(64, 128, 128, 4, 4, GROUP_M=8),
    _cfg(128, 128, 128, 8, 4, GROUP_M=8),
    _cfg(128, 256, 128, 8, 3, GROUP_M=8),
    _cfg(256, 128, 128, 8, 3, GROUP_M=8),
]


def w8a8_configs() -> list:
    return _first_when_interpreting(ALL_W8A8)


# the W8A8 GEMV (M <= 16): the weight streams once, so the grid must fill the SMs by columns alone
ALL_W8A8_GEMV = [
    _cfg(16, 32, 256, 4, 4, GROUP_M=1),
    _cfg(16, 64, 256, 4, 4, GROUP_M=1),
    _cfg(16, 32, 512, 4, 3, GROUP_M=1),
]


def w8a8_gemv_configs() -> list:
    return _first_when_interpreting(ALL_W8A8_GEMV)


def _m_bucket_arg(named_args, kwargs) -> int:
    # Triton's autotuner passes positional arguments in named_args and keyword ones in kwargs
    return {**named_args, **kwargs}["M_BUCKET"]


def prune_w8a8(configs, named_args, **kwargs):
    """Drop tiles far taller than M (a 256-row tile for a 16-row input is wasted work)."""
    m = _m_bucket_arg(named_args, kwargs)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[:1]


GEMV_BLOCK_N = 64


# M <= 16: memory-bound; each program streams a [BLOCK_N, K / SPLIT_K] slice of the weight
ALL_WEIGHT_ONLY_GEMV = [
    _cfg(16, GEMV_BLOCK_N, 128, 4, 4),
    _cfg(16, GEMV_BLOCK_N, 256, 4, 4),
    _cfg(16, GEMV_BLOCK_N, 512, 4, 3),
    _cfg(16, GEMV_BLOCK_N, 256, 8, 4),
]


def weight_only_gemv_configs() -> list:
    return _first_when_interpreting(ALL_WEIGHT_ONLY_GEMV)


# M > 16, the fused GEMM: codes dequantized in registers between the load and the dot
ALL_WEIGHT_ONLY_GEMM = [
    _cfg(32, 64, 128, 4, 4),
    _cfg(64, 128, 128, 4, 4),
    _cfg(128, 128, 128, 8, 3),
    _cfg(128, 256, 64, 8, 3),
]


def weight_only_gemm_configs() -> list:
    return _first_when_interpreting(ALL_WEIGHT_ONLY_GEMM)


# M = 1: the CUDA-core GEMV; BLOCK_N rows of BLOCK_K weights per step (INT4: BLOCK_K / 2 bytes a row)
ALL_WEIGHT_ONLY_GEMV1 = [
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 512}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 1024}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 1024}, num_warps=8, num_stages=2),
]


def weight_only_gemv1_configs() -> list:
    return _first_when_interpreting(ALL_WEIGHT_ONLY_GEMV1)


# the packed-weight kernels (runtimes/triton_packed.py). The GEMV: a program owns BLOCK_N outputs
# over all of K (no split), so narrow tiles give a 4096-wide layer enough programs for 132 SMs.
# Few configs per set: each is compiled at a shape's first call on a new machine
ALL_PACKED_GEMV = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=4, num_stages=2),
]


def packed_gemv_configs() -> list:
    return _first_when_interpreting(ALL_PACKED_GEMV)


# the packed GEMM: a [BLOCK_K / 8, BLOCK_N] int32 word tile a stage
ALL_PACKED_GEMM = [
    _cfg(16, 64, 128, 4, 4, GROUP_M=8),
    _cfg(32, 128, 64, 4, 4, GROUP_M=8),
    _cfg(64, 128, 64, 4, 3, GROUP_M=8),
    _cfg(128, 128, 64, 8, 3, GROUP_M=8),
]


def packed_gemm_configs() -> list:
    return _first_when_interpreting(ALL_PACKED_GEMM)


# the dequantize kernel of the prefill path (M > SMALL_M): BLOCK_N x BLOCK_K outputs a program
DEQUANT_BLOCK = (16, 512)


def gemv_split_k(n: int, k: int, sm_count: int) -> int:
    """Smallest power-of-two split of K giving two waves of programs, each still >= 512 deep in K.

    (N=11008, K=4096 on 132 SMs: 172 column tiles -> split 2; N=4096, K=11008: 64 -> split 8.)
    """
    tiles = triton.cdiv(n, GEMV_BLOCK_N)
    split = 1
    while tiles * split < 2 * sm_count and k // (split * 2) >= 512:
        split *= 2
    return split


def sm_count(device) -> int:
    import torch

    if device.type != "cuda":
        return 1  # the interpreter: no parallelism to fill
    return torch.cuda.get_device_properties(device).multi_processor_count
