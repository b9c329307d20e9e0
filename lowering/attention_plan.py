"""Attention plans for the triton lowering: each attention q-op runs what measured fastest for it.

The build's ``Chooser`` measures each attention q-op node at its lengths (the graph's own where
static, else a 2048-token cache or prompt: ``runtimes.attention_kernels.points``), on fresh
operands of the node's batch, heads, head size, dtype, mask kind and cache format:

* ``attention_quantized_kv``: qcompile's kernel or the q-op's reference (the cache dequantized,
  then SDPA), both the q-op. A node that keeps the reference (slower kernel at any point) calls it
  as torch code, which Inductor compiles as the ``inductor`` target would.
* ``attention_q8``: the 8-bit kernel against SDPA on the same shapes. Only where the build may
  fall back (``target="auto"``) does a node whose kernel measured slower at any point become SDPA
  on its floating-point operands: quantized attention exists to be faster, and SDPA is then both
  faster and exact. An explicit ``target="triton"`` runs the kernel the recipe asked for; either
  way ``explain`` shows the kernel's time against SDPA. A node with both a mask and
  ``is_causal`` (which SDPA does not take together) keeps the kernel.

Each planned node carries its choices in ``node.meta[META_KEY]`` and, where it runs other than its
kernel, what it runs in ``node.meta[RUNS_KEY]`` (what ``explain`` prints).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from qcompiler import torch_compat
from qcompiler.lowering.inductor import IMPLEMENTATIONS
from qcompiler.runtimes import attention_kernels as ak
from qcompiler.runtimes.kernel_choice import META_KEY, RUNS_KEY, Chooser

qops = torch.ops.qcompile

FLOAT_ATTENTION = "sdpa (floating point)"  # what a node runs after giving way to SDPA


def _size(dim):
    return dim if isinstance(dim, int) else None  # a symbolic size: dynamic


def _mask_kind(vals: dict, arg):
    val = vals.get(arg) if isinstance(arg, fx.Node) else arg
    return val.dtype if isinstance(val, torch.Tensor) else None


def _q8_calls(node, vals, device) -> list:
    q, k = vals[node.args[0]], vals[node.args[1]]
    b = _size(q.shape[0]) or 1
    mask_kind = _mask_kind(vals, node.args[3])
    return [ak.q8_args(b, int(q.shape[1]), int(k.shape[1]), lq, lk, int(q.shape[3]), q.dtype, mask_kind,
                       bool(node.args[4]), node.args[5], node.args[6], device)
            for lq, lk in ak.points(_size(q.shape[2]), _size(k.shape[2]))]


def _kv_calls(node, vals, device) -> list:
    a = node.args
    q, codes, tail = vals[a[0]], vals[a[1]], vals[a[4]]
    b = _size(q.shape[0]) or 1
    coded, kept = _size(codes.shape[2]), _size(tail.shape[2])
    lk = coded + kept if coded is not None and kept is not None else None
    return [ak.kv_args(b, int(q.shape[1]), int(tail.shape[1]), lq, keys, int(q.shape[3]), q.dtype,
                       _mask_kind(vals, a[9]), bool(a[10]), a[11], a[12], a[13], a[14], device)
            for lq, keys in ak.points(_size(q.shape[2]), lk)]


def _to_sdpa(node: fx.Node) -> None:
    q, k, v, mask, is_causal, scale, _ = node.args
    node.target = F.scaled_dot_product_attention
    node.args = (q, k, v)
    node.kwargs = {"attn_mask": mask, "is_causal": is_causal, "scale": scale, "enable_gqa": True}


def plan_attention(gm: fx.GraphModule, example_inputs, chooser: Chooser, device, may_fall_back: bool) -> None:
    """Measure and rewrite the graph's attention q-op nodes (module docstring)."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"
             and n.target in (qops.attention_q8.default, qops.attention_quantized_kv.default)]
    if not nodes:
        return
    vals = torch_compat.fake_values(gm, example_inputs)
    for node in nodes:
        q8 = node.target is qops.attention_q8.default
        family = ak.ATTENTION_Q8 if q8 else ak.ATTENTION_QUANTIZED_KV
        calls = (_q8_calls if q8 else _kv_calls)(node, vals, device)
        choices = [chooser.choose(family, args, args[0].shape[2]) for args in calls]
        node.meta[META_KEY] = choices
        if q8 and any(c.measured and (c.speedup or 0.0) < 1.0 for c in choices) and may_fall_back and not (
                node.args[3] is not None and node.args[4]):
            _to_sdpa(node)
            node.meta[RUNS_KEY] = f"{FLOAT_ATTENTION}, the 8-bit kernel measured slower"
        elif not q8 and any(c.kernel != "triton" for c in choices):
            node.target = IMPLEMENTATIONS[qops.attention_quantized_kv.default]
            node.meta[RUNS_KEY] = "dequant_sdpa at every length, its kernel measured slower at one"
    torch_compat.register_constant_sources(gm)
    gm.graph.lint()
    gm.recompile()
