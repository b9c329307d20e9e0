"""Identical activation-quantize calls run once: linears reading the same tensor share its quantization.

The quantize pass gives every linear its own ``quantize_per_token`` / ``quantize_per_tensor``
call, so q, k and v (and gate and up) each quantize the same normed activation: on a GPU that is
one kernel launch and one read of the activation per linear where one would do. ``share`` merges
calls of these q-ops whose arguments are the same: the same nodes, or graph constants (smoothing
scales, static activation scales) of equal dtype, shape and value. Calls that differ in any
argument (another smoothing scale, another format) stay apart, so the graph computes exactly what
it did. Inductor and ONNX Runtime eliminate common subexpressions themselves; the triton lowering
runs this before planning its kernels.
"""
from __future__ import annotations

import hashlib
import operator

import torch
from torch import fx

qops = torch.ops.qcompile

SHAREABLE = (qops.quantize_per_token.default, qops.quantize_per_tensor.default)


def _argument_key(gm: fx.GraphModule, arg):
    """What identifies an argument: a graph constant by its value, any other node by itself."""
    if isinstance(arg, fx.Node):
        value = operator.attrgetter(arg.target)(gm) if arg.op == "get_attr" else None
        if isinstance(value, torch.Tensor):
            data = value.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes()
            return ("constant", str(value.dtype), tuple(value.shape), hashlib.sha256(data).hexdigest())
        return ("node", arg)
    if isinstance(arg, (list, tuple)):
        return tuple(_argument_key(gm, a) for a in arg)
    return ("value", arg)


def share(gm: fx.GraphModule) -> int:
    """Merge identical activation-quantize calls of ``gm`` in place; how many calls went."""
    first, merged = {}, 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SHAREABLE:
            continue
        key = (node.target, tuple(_argument_key(gm, a) for a in node.args),
               tuple(sorted((k, _argument_key(gm, v)) for k, v in node.kwargs.items())))
        if key not in first:
            first[key] = node
            continue
        kept = first[key]
        items = {u.args[1]: u for u in kept.users if u.target is operator.getitem}
        for user in list(node.users):  # the tuple's items: one getitem each
            if user.target is operator.getitem and user.args[1] in items:
                user.replace_all_uses_with(items[user.args[1]])
                gm.graph.erase_node(user)
        node.replace_all_uses_with(kept)
        gm.graph.erase_node(node)
        merged += 1
    if merged:
        gm.graph.lint()
        gm.recompile()
    return merged
