"""Small FX helpers shared by the passes."""
from __future__ import annotations

import itertools

import torch
from torch import fx

_counter = itertools.count()


def add_constant(gm: fx.GraphModule, value: torch.Tensor, prefix: str) -> fx.Node:
    """Register ``value`` as a buffer of ``gm`` and return a get_attr node for it (at the
    graph's current insertion point). Quantized weights and folded scales live here, made once."""
    name = f"_qc_{prefix}_{next(_counter)}"
    gm.register_buffer(name, value.detach().contiguous())
    return gm.graph.get_attr(name)
