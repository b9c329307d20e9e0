"""The Inductor lowering: inline each q-op as torch code and hand the graph to Inductor.

Custom ops are opaque to Inductor, so the q-ops are swapped for torch implementations that it
can fuse: the activation quantize step becomes one fused elementwise/reduction kernel around the
GEMM. ``linear_w8a8`` runs its integer product as a float32 GEMM on the int8 values (exact while
K <= 1024, within float32 rounding beyond), because this CPU has no exact fast INT8 GEMM
(benchmarks/experiments/cpu_int8_kernels.py: ``torch._int_mm`` is an order of magnitude slower than float32
at prefill, and oneDNN's u8s8 kernel is not exact on AVX2 without VNNI). Every implementation
here is tested against the reference q-op.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch
from torch import Tensor, fx

from qcompiler import torch_compat
from qcompiler.ir import attention, attention_static, ops
from qcompiler.ir.ops import REFERENCE
from qcompiler.runtimes.disk_cache import code_version

qops = torch.ops.qcompile


def linear_w8a8_float_gemm(xq: Tensor, x_scale: Tensor, wq: Tensor, w_scale: Tensor,
                           bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``(xq @ wq.T) * x_scale * w_scale + bias`` with a float32 GEMM."""
    y = torch.matmul(xq.to(torch.float32), wq.to(torch.float32).t()) * (x_scale * w_scale)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def linear_w8a8_blocks_float_gemm(x: Tensor, smooth_inv: Optional[Tensor], wq: Tensor, w_scale: Tensor,
                                  bias: Optional[Tensor], block_size: int, out_dtype: torch.dtype) -> Tensor:
    """``linear_w8a8_blocks`` as one float32 GEMM: each block's codes times its scale (the
    dequantized activation, exact in float32) against the int8 weights as floats, then the
    weight scales; the same sum as the reference's, in float32."""
    xq, sx = ops.quantize_per_block_ref(x, block_size, smooth_inv)
    y = torch.matmul(ops.dequantize_blocks(xq, sx, block_size), wq.to(torch.float32).t()) * w_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(out_dtype)


def attention_q8_float_gemm(q, k, v, attn_mask, is_causal: bool, scale: Optional[float], qdtype) -> Tensor:
    """``qcompile::attention_q8`` with float32 products of the 8-bit values."""
    return attention.attention_q8(q, k, v, attn_mask, is_causal, scale, qdtype, torch.float32)


def attention_q8_static_float_gemm(q, k, v, attn_mask, is_causal: bool, scale: Optional[float], *constants_and_qdtype):
    """``qcompile::attention_q8_static`` with float32 products of the 8-bit values."""
    return attention_static.attention_q8_static(q, k, v, attn_mask, is_causal, scale, *constants_and_qdtype,
                                                torch.float32)


IMPLEMENTATIONS = {**REFERENCE, qops.linear_w8a8.default: linear_w8a8_float_gemm,
                   qops.linear_w8a8_blocks.default: linear_w8a8_blocks_float_gemm,
                   qops.attention_q8.default: attention_q8_float_gemm,
                   qops.attention_q8_static.default: attention_q8_static_float_gemm}


def retarget(gm: fx.GraphModule, table) -> fx.GraphModule:
    """Every call of an op in ``table`` calls ``table[op]`` instead (same arguments)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in table:
            node.target = table[node.target]
    gm.recompile()
    return gm


def inline_qops(gm: fx.GraphModule) -> fx.GraphModule:
    return retarget(gm, IMPLEMENTATIONS)


def build(gm: fx.GraphModule, example_inputs, cuda_graphs: bool = False):
    return torch_compat.compile_fx(inline_qops(gm), example_inputs,
                      config_patches={**cuda_graph_patch(cuda_graphs), **cacheable_implementations()})


def cacheable_implementations() -> dict:
    """Inductor's config marking the inlined q-op implementations as safe to cache.

    Inductor's and AOTAutograd's on-disk caches skip a graph that calls a Python function they do not
    know, and AOTAutograd's trace is most of a compile (SmolLM2: about 12 of 21 s), so a new
    process would redo it for every model it loads. Marked functions are keyed by the source of the
    IR and of this lowering (any change to how a q-op computes is a new key) and the versions of
    qcompile and torch. The quantized weights are buffers of the graph, inputs to the compiled
    code, so the cache keys on the graph's structure and shapes, never on their values.
    """
    key = code_version(__file__, *glob.glob(os.path.join(os.path.dirname(attention.__file__), "*.py")))
    return torch_compat.cacheable_functions_patch({f"{fn.__module__}.{fn.__name__}": key
                                                   for fn in IMPLEMENTATIONS.values()})


def cuda_graph_patch(cuda_graphs: bool) -> dict:
    """Inductor's config for ``cuda_graphs``: what torch.compile's mode="reduce-overhead" sets."""
    return {"triton.cudagraphs": cuda_graphs}
