"""Sources for tensors added to a Dynamo graph after capture (quantized weights, prepared layouts).

AOTAutograd looks up every parameter and buffer of a Dynamo graph module in the module's
``_param_name_to_source``; the passes and the lowerings register new constants on the graph, so
each gets a constant source, as Dynamo gives its own.
"""
from __future__ import annotations

from torch import fx


def register_new_sources(gm: fx.GraphModule) -> None:
    """Give every parameter or buffer of ``gm`` that has no source a constant one."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        sources.setdefault(name, ConstantSource(f"qcompile_{name}"))
