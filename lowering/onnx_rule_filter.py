"""onnxscript's rewrite pass over only the rules that can match the graph.

onnxscript's ``RewritePass`` tries every rule at every node, and on SmolLM2's exported graph
trying a rule costs time even where the graph has none of its ops (``Conv``,
``BatchNormalization``, ``ScatterND``, ...). A pattern matches only where the op types of its
required nodes occur, so ``RewriteWherePossible`` gives the pass only the rules whose fixed op
types are all in the graph, then, while a rewrite brings in op types that enable more rules,
those too. Only ops every match needs count (an alternative of a choice, ``OrValue``, does not);
a rule whose pattern it cannot read is always tried. The graph it leaves is the full pass's
(tests/unit/test_onnx.py compares the optimizer with ``optimize_ir``).
"""
from __future__ import annotations

from typing import Optional, Sequence

from onnxscript import ir, rewriter


def _op_types(model: ir.Model) -> set:
    graphs = [model.graph, *model.functions.values()]
    return {(node.domain or "", node.op_type) for graph in graphs
            for node in ir.traversal.RecursiveGraphIterator(graph)}


def _needed(rule) -> Optional[set]:
    """The (domain, op type) pairs every match of ``rule`` contains, None if its pattern is
    unreadable: the ops of the nodes its outputs are computed by through required values only
    (not an alternative of a choice, ``OrValue``, nor an optional input that may be absent)."""
    outputs = getattr(getattr(rule, "_target_pattern", None), "outputs", None)
    if outputs is None:
        return None
    needed, seen, values = set(), set(), list(outputs)
    while values:
        value = values.pop()
        producer = getattr(value, "producer", None)
        node = producer() if callable(producer) else None
        if node is None or id(node) in seen or getattr(value, "can_match_none", False):
            continue
        seen.add(id(node))
        identifier = node.op_identifier() if hasattr(node, "op_identifier") else None
        if identifier is not None:
            needed.add(("" if identifier[0] == "ai.onnx" else identifier[0], identifier[1]))
        values.extend(v for v in node.inputs if v is not None)
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
