"""Small FX helpers shared by the passes."""
from __future__ import annotations

import torch
from torch import fx

from qcompiler import torch_compat


def add_constant(gm: fx.GraphModule, value: torch.Tensor, prefix: str) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` and return a get_attr node for it (at the
    graph's current insertion point). Quantized weights and folded scales live here, made once."""
    index = len(gm._buffers)  # a fresh name in this module: names are never reused or shared
    while hasattr(gm, f"_qc_{prefix}_{index}"):
        index += 1
    name = f"_qc_{prefix}_{index}"
    gm.register_buffer(name, value.detach().contiguous())
    return gm.graph.get_attr(name)


def qop_arguments(node: fx.Node) -> dict:
    """A q-op node's arguments by their names in the op's schema (``{"x": ..., "smooth_inv": ...}``)."""
    names = [a.name for a in torch_compat.op_schema(node.target).arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


VALUE_KEYS = ("example_value", "val")  # where Dynamo and torch.export record a node's (fake) value


def replace_node(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    """``new`` takes ``old``'s place and its recorded value (the same shape and dtype: compilers
    downstream, and the caches that key on the graph, read it), and ``old`` goes."""
    for key in VALUE_KEYS:
        if key in old.meta and key not in new.meta:
            new.meta[key] = old.meta[key]
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
