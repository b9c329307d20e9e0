"""Embed: store embedding tables INT8 per row, and let a tied output projection read the same table.

Runs after ``quantize`` when the recipe's ``embedding`` is ``"int8"``. Each embedding lookup whose
table is a model parameter becomes ``embedding_int8(ids, Wq, sw)`` with
``Wq, sw = quantize_per_channel(W)`` (one scale per row: per row is per output channel of the
``[V, D]`` table read as a linear weight). A linear that ``match`` kept in floating point only
because its weight is that table (a language model's lm_head tied to its input embedding) becomes
``linear_w8a16(x, Wq, sw, b)`` on the very same constants, so the tied weight exists once, in
8 bits, in the compiled graph and in every export. Each rewrite leaves a ``Decision``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import fx

from qcompiler.calibration.state import stats_for
from qcompiler.ir import ops
from qcompiler.passes.graph_utils import add_constant, replace_node
from qcompiler.passes.match import TIED, _pattern_of, graph_parameters, owning_module
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision, node_value
from qcompiler.passes.sqnr import SQNR_ROWS, sqnr_db

qops = torch.ops.qcompile
aten = torch.ops.aten

# embedding call target -> (index of the indices argument, index of the table argument)
EMBEDDING_TARGETS = {F.embedding: (0, 1), aten.embedding.default: (1, 0)}


def _operands(node: fx.Node):
    ids_at, table_at = EMBEDDING_TARGETS[node.target]
    args = list(node.args)
    table = args[table_at] if len(args) > table_at else node.kwargs.get("weight")
    return args[ids_at], table


def _unsupported(node: fx.Node):
    """Why an F.embedding call cannot be a plain row lookup (max_norm rewrites the table), or None."""
    if node.target is F.embedding:
        max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
        if max_norm is not None:
            return "max_norm renormalises the table's rows in place at every lookup"
    return None


@dataclasses.dataclass(frozen=True)
class _Table:
    """One quantized table: its graph constants, owner and values (the tied projection reuses them)."""

    wq_node: fx.Node
    scale_node: fx.Node
    module: str
    wq: torch.Tensor
    scale: torch.Tensor
    param: torch.Tensor


def embed(gm: fx.GraphModule, example_inputs, recipe, decisions: list) -> list:
    """Quantize embedding tables (``recipe.embedding``); return ``decisions`` with one record per
    embedding and the tied output projections' records replaced."""
    if recipe.embedding is None:
        return decisions
    params = graph_parameters(gm, example_inputs)
    tables = {}  # id(param) -> _Table
    records = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in EMBEDDING_TARGETS:
            continue
        ids, table = _operands(node)
        if table not in params or params[table][1].dim() != 2:
            continue
        pname, param = params[table]
        module = owning_module(node, pname.rsplit(".", 1)[0])
        v, d = param.shape
        fp32_bytes = v * d * 4
        why = _unsupported(node) or (None if recipe.for_module(module) is not None
                                     else "kept in floating point by a skip/override pattern")
        if why is None and not param.is_floating_point():
            why = f"table dtype {param.dtype} is not a float type"
        if why is not None:
            records.append(Decision(module=module, op="embedding", scheme=FLOATING_POINT, reason=why,
                                    weight_bytes_fp32=fp32_bytes,
                                    weight_bytes_quantized=fp32_bytes, param_id=id(param)))
            node.meta[META_KEY] = records[-1]
            continue
        if id(param) not in tables:
            wq, scale = ops.quantize_per_channel_ref(param.detach().to(torch.float32))
            with gm.graph.inserting_before(node):
                tables[id(param)] = _Table(add_constant(gm, wq, "embedding_q"), add_constant(gm, scale, "embedding_scale"),
                                           module, wq, scale, param)
        t = tables[id(param)]
        wq, scale = t.wq, t.scale
        out_dtype = node_value(node).dtype if node_value(node) is not None else param.dtype
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(qops.embedding_int8.default, (ids, t.wq_node, t.scale_node, out_dtype))
        replace_node(gm, node, new)
        q_bytes = wq.numel() + scale.numel() * 4
        sqnr = sqnr_db(param.detach().float(), ops.dequantize_ref(wq, scale[:, None]))
        new.meta[META_KEY] = Decision(module=module, op="embedding", scheme=recipe.name,
                                      reason="INT8 table per row, rows dequantized as gathered", sqnr_db=sqnr,
                                      weight_bytes_fp32=fp32_bytes,
                                      weight_bytes_quantized=q_bytes, param_id=id(param))
        records.append(new.meta[META_KEY])
    out = [_tied_projection(gm, d, tables) if d.op == "linear" and d.reason == TIED and d.param_id in tables
           else d for d in decisions]
    gm.graph.lint()
    gm.recompile()
    return out + records


def _tied_projection(gm: fx.GraphModule, decision: Decision, tables: dict) -> Decision:
    """The FP linear node(s) of ``decision`` (its weight is a quantized table) -> ``linear_w8a16``
    on the table's constants."""
    t = tables[decision.param_id]
    new_decision = None
    for node in list(gm.graph.nodes):
        if node.meta.get(META_KEY) is not decision:
            continue
        x, _, bias = _pattern_of(node).operands(node)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(qops.linear_w8a16.default, (x, t.wq_node, t.scale_node, bias))
        replace_node(gm, node, new)
        if new_decision is None:
            new_decision = dataclasses.replace(
                decision, scheme="w8a16", sqnr_db=_sqnr(t),
                reason=f"INT8 weights per channel, weights only: the INT8 table of {t.module} (tied), stored once",
                weight_bytes_quantized=t.wq.numel() + t.scale.numel() * 4)
        new.meta[META_KEY] = new_decision
    return new_decision or decision


def _sqnr(table: "_Table"):
    """The tied projection's output SQNR on its calibration rows (None without them)."""
    stats = stats_for(table.param)
    if stats is None or not stats.rows.shape[0]:
        return None
    rows = stats.rows[:SQNR_ROWS].to(torch.float32)
    ref = F.linear(rows, table.param.detach().to(torch.float32))
    return sqnr_db(ref, ops.linear_w8a16_ref(rows, table.wq, table.scale, None))
