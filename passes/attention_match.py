"""Hand-written attention: ``matmul(Q, K^T) -> scale -> + masks -> softmax -> matmul(P, V)`` in a graph.

Models that do not call ``scaled_dot_product_attention`` (MPNet; transformers' "eager" attention
of every decoder) write attention out. ``find_handwritten(gm)`` walks back from each
``matmul(P, V)``: through what leaves P's values alone in inference (dropout that is off, a dtype
cast) to a softmax over the last dimension, then through additive terms (masks, position biases)
and one multiplication or division by a number, to ``matmul(Q, K^T)`` with ``K^T`` a transpose of
the last two dimensions of K. Each match is a ``HandWritten`` in SDPA's terms (query, key, value,
the additive terms that make the mask, the scale), which the attention pass treats as it treats
``scaled_dot_product_attention``. The intermediate results must have no other use (attention
probabilities returned with ``output_attentions`` keep the attention in floating point, with the
reason).
"""
from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from qcompiler.passes.meta import node_value

aten = torch.ops.aten

MATMULS = {torch.matmul, aten.matmul.default, operator.matmul}
SOFTMAXES = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default, "softmax"}
ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor, "add", "add_"}
SCALES = {operator.mul: False, operator.truediv: True, torch.mul: False, torch.div: True,
          aten.mul.Tensor: False, aten.div.Tensor: True, aten.mul.Scalar: False, aten.div.Scalar: True,
          "mul": False, "div": True}  # target -> whether it divides
DROPOUTS = {F.dropout, aten.dropout.default, "dropout"}
CASTS = {"to", "type", "type_as", "float", aten._to_copy.default}
_LAST_TWO = ({-1, -2}, {2, 3})


@dataclass
class HandWritten:
    """One hand-written attention in ``scaled_dot_product_attention``'s terms."""

    output: fx.Node          # matmul(P, V): the node the q-op replaces
    query: fx.Node
    key: fx.Node             # K itself (the transpose's input)
    value: fx.Node
    mask_terms: list         # the nodes added to the scores (masks, biases), in graph order
    scale: float
    chain: list              # the intermediate nodes, output first (removed after the rewrite)
    reason: str = ""         # why it stays in floating point ("" when it can be quantized)


def _target(node: fx.Node):
    return node.target if node.op in ("call_function", "call_method") else None


def _is(node, table) -> bool:
    return isinstance(node, fx.Node) and _target(node) in table


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = _arg(node, 1, "dim")
    value = node_value(node)
    return dim == -1 or (value is not None and dim == value.dim() - 1)


def _passes_values(node: fx.Node) -> bool:
    """A dropout that is off or a cast: P's values pass through (in inference)."""
    if _is(node, DROPOUTS):
        return _arg(node, 2, "train", _arg(node, 2, "training", True)) is False or _arg(node, 1, "p", 0.5) in (0, 0.0)
    return _is(node, CASTS)


def _transposed_key(node) -> Optional[fx.Node]:
    """K when ``node`` is K with its last two dimensions swapped (transpose(-1, -2) / (2, 3), ``.mT``)."""
    if not isinstance(node, fx.Node):
        return None
    t = _target(node)
    if t in ("transpose", torch.transpose, aten.transpose.int) and len(node.args) == 3:
        return node.args[0] if set(node.args[1:]) in _LAST_TWO else None
    if t is getattr and node.args[1] == "mT":
        return node.args[0]
    if t in ("permute", aten.permute.default, torch.permute):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return node.args[0] if list(dims) == [0, 1, 3, 2] else None
    return None


def _match(pv: fx.Node) -> Optional[HandWritten]:
    p, v = pv.args[0], pv.args[1]
    chain = [pv]
    while isinstance(p, fx.Node) and _passes_values(p):
        chain.append(p)
        p = p.args[0]
    if not (_is(p, SOFTMAXES) and _softmax_dim_is_last(p)):
        return None
    chain.append(p)
    scores, terms, scale = p.args[0], [], 1.0
    while True:  # additive terms and one scale, in any order, back to matmul(Q, K^T)
        if _is(scores, ADDS) and len(scores.args) == 2 and not scores.kwargs.get("alpha"):
            a, b = scores.args
            chained = a if isinstance(a, fx.Node) and _reaches_qk(a) else b
            term = b if chained is a else a
            if not isinstance(term, fx.Node):
                return None
            terms.insert(0, term)
        elif _is(scores, SCALES) and scale == 1.0 and len(scores.args) == 2 and _number(scores.args[1]):
            factor = _number(scores.args[1])
            scale = 1.0 / factor if SCALES[_target(scores)] else factor
            chained = scores.args[0]
        elif _is(scores, MATMULS):
            break
        else:
            return None
        chain.append(scores)
        scores = chained
    key = _transposed_key(scores.args[1])
    if key is None:
        return None
    chain.extend([scores, scores.args[1]])
    return HandWritten(pv, scores.args[0], key, v, terms, scale, chain)


def _number(x) -> Optional[float]:
    """A nonzero constant: a Python number, or ``torch.full([], c)`` (GPT-2 divides by one)."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x) or None
    if _is(x, {torch.full}) and len(x.args) >= 2 and list(x.args[0]) == [] and isinstance(x.args[1], numbers.Real):
        return float(x.args[1]) or None
    return None


def _reaches_qk(node: fx.Node, depth: int = 4) -> bool:
    """Whether ``node`` is on the scores' side of an addition (a matmul within a few adds/scales)."""
    for _ in range(depth):
        if _is(node, MATMULS):
            return True
        if not (_is(node, ADDS) or _is(node, SCALES)) or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def _used_elsewhere(m: HandWritten) -> str:
    inside = set(m.chain)
    for node in m.chain[1:-1]:  # the transpose of K may serve others: it stays then
        if any(user not in inside for user in node.users):
            return (f"its intermediate result {node.name!r} is used outside the attention (e.g. attention "
                    f"probabilities returned with output_attentions)")
    return ""


def find_handwritten(gm: fx.GraphModule) -> list:
    """Every hand-written attention in ``gm``, with ``reason`` set when it cannot be rewritten."""
    found = []
    for node in gm.graph.nodes:
        if _is(node, MATMULS) and len(node.args) == 2:
            m = _match(node)
            if m is not None:
                m.reason = _used_elsewhere(m)
                found.append(m)
    return found


def remove_chain(gm: fx.GraphModule, m: HandWritten) -> None:
    """Erase the matched intermediate nodes that nothing uses any more (after the rewrite)."""
    for node in m.chain:
        if not getattr(node, "_erased", False) and not node.users:
            gm.graph.erase_node(node)
