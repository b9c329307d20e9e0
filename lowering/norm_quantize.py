"""The triton lowering's fusion of an RMS norm into the activation quantization that reads it.

After ``shared_qops`` merged the quantize calls of q/k/v (and of gate/up), each reads a normed
activation whose only reader it is. ``fuse`` finds the norm as transformers' Llama-family
``RMSNorm`` writes it (Llama, Qwen2, Mistral, Phi3: ``weight * (h32 * rsqrt(mean(h32 ** 2) + eps))
.to(dtype)`` with ``h32 = h.to(float32)``) and replaces norm and quantize by one
``qcompile_triton::rmsnorm_quantize`` call (``runtimes.triton_norm_quantize``, with its plain-torch
reference). A norm written otherwise (Gemma's ``1 + weight`` in float32, LayerNorm), one that other
nodes read too, or a row longer than the kernel's tile stays as it was: Inductor's norm kernel,
then the quantize kernel.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from qcompiler.runtimes import triton_norm_quantize as tnq

qops = torch.ops.qcompile
MUL = (operator.mul, torch.mul)
ADD = (operator.add, torch.add)


def _fake(h, weight, eps, smooth_inv, qdtype, out_dtype):
    return h.new_empty(h.shape, dtype=qdtype), h.new_empty((*h.shape[:-1], 1), dtype=torch.float32)


def _register():
    schema = "(Tensor h, Tensor weight, float eps, Tensor? smooth_inv, ScalarType qdtype, ScalarType out_dtype) -> (Tensor, Tensor)"
    op = torch.library.custom_op("qcompile_triton::rmsnorm_quantize", tnq.rmsnorm_quantize, mutates_args=(), schema=schema)
    op.register_fake(_fake)
    return torch.ops.qcompile_triton.rmsnorm_quantize.default


FUSED = _register()


@dataclass(frozen=True)
class Norm:
    """A matched RMS norm: its input ``h``, ``weight`` node, ``eps``, output dtype, and its nodes."""

    h: fx.Node
    weight: fx.Node
    eps: float
    dtype: torch.dtype
    nodes: tuple  # output first


def _is(node, op: str, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == op and node.target in targets


def _value(node, gm: fx.GraphModule):
    """A node's (fake) value: recorded by Dynamo, or a graph constant's own tensor (a folded scale)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    if v is None and node.op == "get_attr":
        v = operator.attrgetter(node.target)(gm)
    return v if isinstance(v, torch.Tensor) else None


def _to_float32(node) -> Optional[fx.Node]:
    """``h`` of ``h.to(torch.float32)`` / ``h.float()``."""
    if _is(node, "call_method", ("to",)) and len(node.args) == 2 and node.args[1] is torch.float32 and not node.kwargs:
        return node.args[0]
    if _is(node, "call_method", ("float",)) and len(node.args) == 1:
        return node.args[0]
    return None


def match(out: fx.Node, gm: fx.GraphModule) -> Optional[Norm]:
    """The Llama-family RMS norm whose output is ``out`` (module docstring), or None."""
    if not _is(out, "call_function", MUL) or len(out.args) != 2:
        return None
    for weight, cast in (out.args, out.args[::-1]):
        if not (_is(cast, "call_method", ("to",)) and len(cast.args) == 2 and isinstance(cast.args[1], torch.dtype)):
            continue
        wv = _value(weight, gm)
        if wv is None or wv.dim() != 1 or wv.dtype != cast.args[1]:
            continue
        scaled = cast.args[0]
        if not _is(scaled, "call_function", MUL) or len(scaled.args) != 2:
            continue
        h32, rs = scaled.args
        if not _is(rs, "call_function", (torch.rsqrt,)):
            continue
        add = rs.args[0]
        if not _is(add, "call_function", ADD) or not isinstance(add.args[1], float):
            continue
        mean = add.args[0]
        if not (_is(mean, "call_method", ("mean",)) and mean.args[0] is not None and tuple(mean.args[1:]) in ((-1,), ((-1,),))
                and mean.kwargs == {"keepdim": True}):
            continue
        square = mean.args[0]
        if not (_is(square, "call_method", ("pow",)) and square.args[1:] == (2,) and square.args[0] is h32):
            continue
        h = _to_float32(h32)
        hv = _value(h, gm)
        if h is None or hv is None or hv.shape[-1] != wv.shape[0] or hv.shape[-1] > tnq.MAX_ROW:
            continue
        nodes = (out, cast, scaled, rs, add, mean, square, h32)
        inner = {id(n) for n in nodes}
        if any(id(u) not in inner for n in nodes[1:] for u in n.users):  # read elsewhere: keep the norm
            continue
        return Norm(h, weight, add.args[1], cast.args[1], nodes)
    return None


def fuse(gm: fx.GraphModule) -> int:
    """Fuse each quantize call with the RMS norm it alone reads; how many were fused."""
    fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != qops.quantize_per_token.default:
            continue
        x, smooth_inv, qdtype = (list(node.args) + [None, torch.int8])[:3]
        if len(node.users) == 0 or not isinstance(x, fx.Node) or len(x.users) != 1:
            continue
        norm = match(x, gm)
        if norm is None:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(FUSED, (norm.h, norm.weight, norm.eps, smooth_inv, qdtype, norm.dtype))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for n in norm.nodes:  # output first: each is unread once the one after it is gone
            if not n.users:
                gm.graph.erase_node(n)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused
