"""The ONNX Runtime graph rewrites qcompile's sessions turn off, each where it was measured slower.

ONNX Runtime rewrites a model when a session loads it (``ORT_ENABLE_ALL``). Most rewrites pay;
``SLOW_FUSIONS`` lists those that made a model slower on the shapes qcompile runs, each with the
condition, read from the model's op types, under which it is turned off (``InferenceSession``'s
``disabled_optimizers``). A newcomer adds a row with its measurement; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable


@dataclass(frozen=True)
class SlowFusion:
    """One ONNX Runtime optimizer (its name in ``disabled_optimizers``), the models it is turned off
    for (``applies``: the model's op types -> bool) and the page that measured it."""

    optimizer: str
    applies: Callable[[frozenset], bool]
    measured: str


SLOW_FUSIONS = (
    # Add + LayerNormalization -> SkipLayerNormalization, which ONNX Runtime makes where the sum is
    # not an output of its own (a post-norm encoder's residual): the fused CPU kernel ran 2.8-3.8x
    # slower than the pair from 32 rows up (MiniLM 8x128: 1120 against 327 us a norm), MiniLM's
    # sessions 1.08-1.19x faster without it. Opset 23's RMSNormalization (the ort form's,
    # Llama-like decoders) is not fused by it: such models keep the rewrite.
    SlowFusion("SkipLayerNormFusion", lambda op_types: "LayerNormalization" in op_types,
               "docs/results/ort_session_settings_xeon_amx.md"),
)


def op_types(graph) -> frozenset:
    """The op types of an ``onnx.GraphProto``'s nodes, those of its subgraphs (If, Loop) included."""
    found = set()
    for node in graph.node:
        found.add(node.op_type)
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                found |= op_types(sub)
    return frozenset(found)


def disabled_optimizers(types: Iterable[str]) -> list:
    """The optimizers of ``SLOW_FUSIONS`` a model with these op types runs without."""
    types = frozenset(types)
    return [fusion.optimizer for fusion in SLOW_FUSIONS if fusion.applies(types)]
