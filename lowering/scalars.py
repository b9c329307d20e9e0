"""Floats Dynamo lifts to graph inputs: under ``dynamic=True`` a Python float (a module's ``eps``)
becomes a 0-d tensor input that the graph reads with ``.item()``. Outside Dynamo that read is
data-dependent, so an ONNX export and a graph compiled outside Dynamo take the value as a constant.
"""
from __future__ import annotations

import torch
from torch import fx


def item_only(node: fx.Node, value) -> bool:
    """Whether placeholder ``node`` (value ``value``) is a 0-d tensor the graph only reads with
    ``.item()``: a Python float Dynamo lifted to a tensor input (``dynamic=True``), such as a
    module's ``eps``."""
    users = list(node.users)
    return (isinstance(value, torch.Tensor) and value.dim() == 0 and bool(users)
            and all(u.op == "call_method" and u.target == "item" for u in users))


def freeze_scalars(gm: fx.GraphModule, values: dict) -> None:
    """Replace each ``.item()`` of the placeholders at the indices of ``values`` (placeholder
    index -> float) by that number; the placeholders stay (callers still pass them)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, value in values.items():
        for u in list(placeholders[i].users):
            u.replace_all_uses_with(value)
            gm.graph.erase_node(u)
    if values:
        gm.recompile()
