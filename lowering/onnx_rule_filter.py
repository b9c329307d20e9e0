"""onnxscript's rewrite pass over only the rules that can match the graph.

onnxscript's ``RewritePass`` tries every rule at every node; on SmolLM2's exported graph (about
2700 nodes) each of its ~60 default rules costs 0.1-1 s to try even where the graph has none of
its ops (``Conv``, ``BatchNormalization``, ``ScatterND``, ...). A pattern matches only where all
of its nodes' op types occur, so ``RewriteWherePossible`` gives the pass only the rules whose
fixed op types are all in the graph, then, while a rewrite brings in op types that enable more
rules, those too. A rule whose pattern it cannot read (a variable op type, another class of rule)
is always tried. The graph it leaves is the full pass's (tests/unit/test_onnx.py compares the
optimizer with ``optimize_ir``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from onnxscript import ir, rewriter


def _op_types(model: ir.Model) -> set:
    graphs = [model.graph, *model.functions.values()]
    return {(node.domain or "", node.op_type) for graph in graphs
            for node in ir.traversal.RecursiveGraphIterator(graph)}


def _needed(rule) -> Optional[set]:
    """The (domain, op type) pairs every match of ``rule`` contains; None if unreadable."""
    pattern = getattr(rule, "_target_pattern", None)
    nodes = getattr(pattern, "_nodes", None)
    if nodes is None:
        return None
    needed = set()
    for node in nodes:
        identifier = node.op_identifier() if hasattr(node, "op_identifier") else None
        if identifier is not None:
            domain, op_type = identifier[0], identifier[1]
            needed.add(("" if domain == "ai.onnx" else domain, op_type))
    return needed


class RewriteWherePossible(ir.passes.InPlacePass):
    def __init__(self, rules: Sequence):
        super().__init__()
        self.rules = [(rule, _needed(rule)) for rule in rules]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        tried, modified = set(), False
        while True:
            present = _op_types(model)
            ready = [rule for rule, needed in self.rules
                     if id(rule) not in tried and (needed is None or needed <= present)]
            if not ready:
                return ir.passes.PassResult(model, modified)
            tried.update(map(id, ready))
            modified |= rewriter.RewritePass(ready).call(model).modified
