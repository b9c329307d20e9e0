"""The ``triton`` lowering: every q-op in the graph runs as our Triton kernels, the rest through Inductor.

Each q-op is swapped for a ``qcompile_triton::`` custom op whose implementation is the kernel
launcher in ``qcompiler.runtimes.triton_*`` and whose fake is the q-op's own, so Inductor compiles
the graph around them (norms, floating-point attention, residuals) and calls the kernels as extern calls. Scales
and packed weights arrive as graph constants; nothing here recomputes them. Each linear q-op first
gets a kernel plan (``triton_plan``): per M bucket, the kernel measured fastest on this GPU among
torch's built-ins and qcompile's Triton kernels, checked against the q-op reference; each
attention q-op is measured against SDPA (``attention_plan``).

Under ``target="auto"`` (``strict`` False) the target is kept only where it measured faster: a
graph whose planned linears are not faster than the float linears of the same shapes is compiled
by Inductor instead, and ``explain`` says so with the measurement.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the CI tests it).
"""
from __future__ import annotations

import torch
from torch import fx

from qcompiler import torch_compat
from qcompiler.ir import ops
from qcompiler.lowering.devices import input_device
from qcompiler.lowering import inductor
from qcompiler.lowering.attention_plan import plan_attention
from qcompiler.lowering.fallback import Chosen, shared_copy
from qcompiler.lowering.inductor import cuda_graph_patch, inline_qops, retarget
from qcompiler.lowering.norm_quantize import fuse as fuse_norms
from qcompiler.lowering.shared_qops import share
from qcompiler.lowering.triton_plan import drop_plans, plan_graph, speed_against_float
from qcompiler.runtimes import (kernel_choice, linear_kernels, tinygemm, triton_attention, triton_kv_attention,
                                triton_packed, triton_quantize, triton_tuning, triton_w8a8, triton_weight_only)
from qcompiler.runtimes.triton_support import require

qops = torch.ops.qcompile

# q-op name -> the Triton launcher that implements it (same arguments, same results)
KERNELS = {
    "quantize_per_token": triton_quantize.quantize_per_token,
    "quantize_per_tensor": triton_quantize.quantize_per_tensor,
    "linear_w8a8": triton_w8a8.linear_w8a8,
    "linear_w8a16": triton_weight_only.linear_w8a16,
    "linear_w4a16": triton_weight_only.linear_w4a16,
    "attention_q8": triton_attention.attention_q8,
    "attention_quantized_kv": triton_kv_attention.attention_quantized_kv,
}


def _register(name: str, launcher):
    """``qcompile_triton::<name>``: the q-op's schema and fake, the launcher as its kernel."""
    schema = str(torch_compat.op_schema(getattr(qops, name).default))
    op = torch.library.custom_op(f"qcompile_triton::{name}", launcher, mutates_args=(),
                                 schema=schema[schema.index("("):])
    op.register_fake(ops.FAKES[name])
    return getattr(torch.ops.qcompile_triton, name).default


TRITON_OPS = {getattr(qops, name).default: _register(name, launcher) for name, launcher in KERNELS.items()}


# the source a measured kernel choice depends on: a change to any of them re-measures
KERNEL_SOURCES = tuple(m.__file__ for m in (linear_kernels, kernel_choice, tinygemm, triton_packed, triton_tuning,
                                            triton_w8a8, triton_weight_only))


def swap_qops(gm: fx.GraphModule) -> fx.GraphModule:
    """q-op nodes -> their Triton custom ops."""
    return retarget(gm, TRITON_OPS)


def build(gm: fx.GraphModule, example_inputs, cuda_graphs: bool = False, strict: bool = True):
    """The graph's callable. ``strict`` False (``target="auto"``): the graph is compiled by
    Inductor instead unless its planned linears measured faster than the float linears
    (``triton_plan.speed_against_float``), and an 8-bit attention slower than SDPA runs SDPA."""
    device = input_device(example_inputs)
    require(device)
    spare = None if strict else shared_copy(gm)  # what Inductor compiles if the kernels measure slower
    share(gm)  # linears reading one activation quantize it once (lowering/shared_qops.py)
    fuse_norms(gm)  # and an RMS norm feeding that quantize runs in its kernel (lowering/norm_quantize.py)
    chooser = kernel_choice.Chooser.for_device(device, KERNEL_SOURCES)
    # each linear q-op runs the kernel measured fastest for its shapes (lowering/triton_plan.py),
    # each attention q-op what measured fastest for it (lowering/attention_plan.py)
    choices = plan_graph(gm, example_inputs, chooser)
    plan_attention(gm, example_inputs, chooser, device, may_fall_back=not strict)
    ratio, measured = speed_against_float(choices)
    if not strict and not (ratio or 0.0) > 1.0:
        drop_plans(gm)  # explain reads this graph: none of its kernels runs
        return Chosen(inductor.build(spare, example_inputs, cuda_graphs=cuda_graphs), "inductor",
                      f"triton: {measured}" + ("" if ratio is None else ", not faster") + "; compiled by Inductor instead")
    # q-ops without a kernel (dequantize) are inlined as torch code for Inductor to fuse; the
    # kernels have no gradients (CompiledGraph runs under no_grad), so compile for inference
    with torch.no_grad():
        fn = torch_compat.compile_fx(inline_qops(swap_qops(gm)), example_inputs, config_patches=cuda_graph_patch(cuda_graphs))
    return fn if strict else Chosen(fn, "triton", note=f"auto kept triton: {measured}")
