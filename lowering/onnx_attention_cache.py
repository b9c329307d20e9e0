"""Attention over the 3-D projections, the cache's past keys and values inside the op (an ORT-form graph rewrite).

The exporter writes a decoder layer's attention over heads: each projection ``[B, S, H*D]`` is
reshaped to ``[B, S, H, D]`` and transposed to ``[B, H, S, D]``, RoPE (one ``RotaryEmbedding``
after ``lowering.onnx_rotary``) turns the query and key heads, a ``Concat`` puts the cache's past
keys and values before the new ones, and the 4-D ``Attention``'s output is transposed and reshaped
back to ``[B, S, H*D]``; an encoder has the same splits and merge, without RoPE or a cache.

Opset 23 states the same computation with fewer nodes: ``Attention`` takes the 3-D projections
(``q_num_heads``, ``kv_num_heads``) and the past keys and values as inputs of its own, and returns
the present ones (past then new: the ``Concat``'s values) as outputs, and ``RotaryEmbedding``
turns 3-D projections given ``num_heads``. A decode layer loses eleven nodes: three reshapes and
three transposes before the op, a reshape, a transpose and a reshape after it, and two concats.
ONNX Runtime's CPU kernels compute the same values (tests/unit/test_onnx_attention_cache.py
compares the logits and the present cache with and without the rewrite, bit for bit).

Where a mask is given, transformers repeats the key and value heads for the query heads in the
graph (``repeat_kv``: ``Unsqueeze``, ``Expand``, ``Reshape``); the 3-D op groups the query heads
over the unrepeated ones the same way, so the repeat is folded too, and the mask stays the op's
input. Only chains whose every step is one of these are taken, each intermediate value read by
the next step alone. The present keys and values may be read anywhere (the op returns them; a
sliding window's crop may read them before the 4-D op, and the 3-D op then goes before it). A
past is folded into the op only without ``is_causal``: the op's causal mask over a past is
aligned to the end of the keys, the 4-D op's over concatenated keys to their start.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import onnx_ir.passes.common as common_passes
from onnxscript import ir

from qcompiler.lowering.onnx_graph import HEADS, int_dim, producer, replace_keeping_name
from qcompiler.lowering.onnx_sibling_matmuls import constant_array

class Projection(NamedTuple):
    flat: ir.Value  # [B, S, H*D], before the heads were split
    heads: int
    rope: Optional[ir.Node]  # the RotaryEmbedding the heads went through, if any


class Cached(NamedTuple):
    projection: Projection
    past: Optional[ir.Value]  # [B, H, P, D], the cache's keys or values before this step
    present: ir.Value  # what the graph reads as this step's keys or values (the Concat's output)
    reader: ir.Node  # the node of the chain that reads ``present`` (the op, or the head repeat)


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    """``value`` is read by ``node`` alone (and is no output of the graph)."""
    return not value.is_graph_output() and all(use.node is node for use in value.uses())


def _perm(node: ir.Node):
    perm = node.attributes.get("perm")
    return list(perm.as_ints()) if perm is not None else None


def _split_heads(value: ir.Value, user: ir.Node, shared: bool = False):
    """(flat, heads) when ``value`` is ``Transpose(Reshape(flat), perm=[0, 2, 1, 3])`` cutting the
    last dimension of a ``[B, S, H*D]`` value into heads, read by ``user`` alone unless ``shared``."""
    transpose = producer(value, "Transpose")
    if transpose is None or _perm(transpose) != HEADS or not (shared or _only_use(value, user)):
        return None
    split = transpose.inputs[0]
    reshape = producer(split, "Reshape")
    if reshape is None or not _only_use(split, transpose):
        return None
    flat = reshape.inputs[0]
    if flat.shape is None or split.shape is None or flat.shape.rank() != 3 or split.shape.rank() != 4:
        return None
    heads, size = int_dim(split, 2), int_dim(split, 3)
    if heads is None or size is None or int_dim(flat, 2) != heads * size:
        return None
    if flat.shape[0] != split.shape[0] or flat.shape[1] != split.shape[1]:
        return None
    return flat, heads


def _plain_rope(node: ir.Node) -> bool:
    """A full-head ``RotaryEmbedding`` fed cos/sin tables per row (no position ids)."""
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return False
    dim = node.attributes.get("rotary_embedding_dim")
    return dim is None or dim.as_int() == 0


def _projection(value: ir.Value, user: ir.Node, shared: bool = False) -> Optional[Projection]:
    """The projection behind the heads ``value`` that ``user`` reads (through RoPE or not)."""
    rope = producer(value, "RotaryEmbedding")
    if rope is not None:
        if not (shared or _only_use(value, user)) or not _plain_rope(rope):
            return None
        found = _split_heads(rope.inputs[0], rope)
        return Projection(*found, rope) if found is not None else None
    found = _split_heads(value, user, shared)
    return Projection(*found, None) if found is not None else None


def _same(a, b) -> bool:
    return a == b and (isinstance(a, int) or a.value is not None)


def _unrepeated(value: ir.Value, attention: ir.Node):
    """(heads, the node that reads them) behind transformers' ``repeat_kv`` (``Unsqueeze`` at axis 2,
    ``Expand`` to ``[B, H, n, T, D]``, ``Reshape`` to ``[B, H*n, T, D]``) that ``attention`` reads,
    or (``value``, ``attention``) when there is none. The 3-D op groups query heads over the
    unrepeated key and value heads as the repeat did (query head i reads key head i // (Hq / H))."""
    reshape = producer(value, "Reshape")
    expand = producer(reshape.inputs[0], "Expand") if reshape is not None else None
    unsqueeze = producer(expand.inputs[0], "Unsqueeze") if expand is not None else None
    if unsqueeze is None or not (_only_use(value, attention) and _only_use(reshape.inputs[0], reshape)
                                 and _only_use(expand.inputs[0], expand)) or len(unsqueeze.inputs) != 2:
        return value, attention
    heads, wide, merged = unsqueeze.inputs[0], expand.outputs[0], value
    axes = constant_array(unsqueeze.inputs[1])
    if axes is None or axes.reshape(-1).tolist() != [2] or any(v.shape is None for v in (heads, wide, merged)) \
            or (heads.shape.rank(), wide.shape.rank(), merged.shape.rank()) != (4, 5, 4):
        return value, attention
    h, n = int_dim(heads, 1), int_dim(wide, 2)
    if h is None or n is None or int_dim(wide, 1) != h or int_dim(merged, 1) != h * n or not all(
            _same(heads.shape[i], wide.shape[j]) and _same(heads.shape[i], merged.shape[i])
            for i, j in ((0, 0), (2, 3), (3, 4))):
        return value, attention
    return heads, unsqueeze


def _cached(value: ir.Value, attention: ir.Node) -> Optional[Cached]:
    """The key or value input of ``attention``: new heads, after a past along the sequence axis or
    not, repeated for the query heads or not."""
    value, reader = _unrepeated(value, attention)
    concat = producer(value, "Concat")
    if concat is not None:
        axis = concat.attributes.get("axis")
        if len(concat.inputs) != 2 or axis is None or axis.as_int() not in (2, -2) \
                or concat.inputs[0].shape is None or concat.inputs[0].shape.rank() != 4:
            return None
        found = _projection(concat.inputs[1], concat)
        return Cached(found, concat.inputs[0], value, reader) if found is not None else None
    found = _projection(value, reader, shared=True)
    return Cached(found, None, value, reader) if found is not None else None


def _sole_user(value: ir.Value):
    """The one default-domain node that reads ``value`` (no graph output), else None."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1 or uses[0].node.domain not in ("", "ai.onnx"):
        return None
    return uses[0].node


def _known(value) -> bool:
    return value.shape is not None and all(isinstance(d, int) or d.value is not None for d in value.shape)


def _merged(attention: ir.Node) -> Optional[ir.Value]:
    """The ``[B, S, H*D]`` value the graph makes of ``attention``'s 4-D output (an identity
    ``Reshape`` or none, ``Transpose(perm=[0, 2, 1, 3])``, ``Reshape`` to rank 3), else None."""
    value = attention.outputs[0]
    node = _sole_user(value)
    if node is not None and node.op_type == "Reshape" and _known(value) and _known(node.outputs[0]) \
            and list(node.outputs[0].shape) == list(value.shape):
        value, node = node.outputs[0], _sole_user(node.outputs[0])  # the exporter's view to the shape it has
    if node is None or node.op_type != "Transpose" or _perm(node) != HEADS:
        return None
    value, node = node.outputs[0], _sole_user(node.outputs[0])
    if node is None or node.op_type != "Reshape" or value.shape is None or value.shape.rank() != 4:
        return None
    merged = node.outputs[0]
    if merged.shape is None or merged.shape.rank() != 3 or merged.shape[0] != value.shape[0] \
            or merged.shape[1] != value.shape[1] or int_dim(value, 2) is None or int_dim(value, 3) is None \
            or int_dim(merged, 2) != int_dim(value, 2) * int_dim(value, 3):
        return None
    return merged


def _other_readers(cached: Cached) -> list:
    """The nodes besides the chain that read the present keys or values (a sliding window's crop)."""
    return [use.node for use in cached.present.uses() if use.node is not cached.reader]


def _match(attention: ir.Node):
    if attention.domain not in ("", "ai.onnx") or attention.op_type != "Attention" \
            or len(attention.inputs) > 4 or len(attention.outputs) != 1:
        return None
    if attention.attributes.get("q_num_heads") is not None or attention.inputs[0].shape is None \
            or attention.inputs[0].shape.rank() != 4:
        return None
    query = _projection(attention.inputs[0], attention)
    key, value = (_cached(attention.inputs[i], attention) for i in (1, 2))
    if query is None or key is None or value is None or (key.past is None) != (value.past is None):
        return None
    causal = attention.attributes.get("is_causal")
    if key.past is not None and causal is not None and causal.as_int():
        return None
    merged = _merged(attention)
    if merged is None or key.projection.heads != value.projection.heads or query.heads % key.projection.heads:
        return None
    return query, key, value, merged


def _rotated(graph: ir.Graph, projection: Projection, before: ir.Node, name: str) -> ir.Value:
    """The 3-D projection with the RoPE its heads went through, as a 3-D ``RotaryEmbedding``."""
    if projection.rope is None:
        return projection.flat
    old = projection.rope
    attributes = [a for a in old.attributes.values() if a.name != "num_heads"]
    rope = ir.Node("", "RotaryEmbedding", [projection.flat, old.inputs[1], old.inputs[2]],
                   [*attributes, ir.AttrInt64("num_heads", projection.heads)], name=name)
    rope.outputs[0].shape, rope.outputs[0].type = projection.flat.shape, projection.flat.type
    graph.insert_before(before, [rope])
    return rope.outputs[0]


def _anchor(graph: ir.Graph, old: ir.Node, key: Cached, value: Cached, needed: list):
    """Where the 3-D op goes: before the 4-D op, or before an earlier reader of the present keys
    or values (the op returns them); None when one of ``needed`` is computed only after that."""
    order = {id(node): i for i, node in enumerate(graph)}
    anchor = min([old, *_other_readers(key), *_other_readers(value)], key=lambda node: order[id(node)])
    for input_ in needed:
        producer = input_.producer() if input_ is not None else None
        if producer is not None and order[id(producer)] >= order[id(anchor)]:
            return None
    return anchor


def fold_attention_heads(model: ir.Model) -> int:
    """Rewrite every 4-D ``Attention`` of ``model``'s main graph whose inputs are split heads
    (through RoPE, after a past, repeated or not) into the 3-D op with the past as its inputs;
    returns how many (the nodes they leave unused are for the caller's unused-node pass)."""
    graph = model.graph
    # the rewrites before this one leave their replaced nodes for the unused-node pass, and a
    # dead reader would make a head split look shared
    common_passes.RemoveUnusedNodesPass()(model)
    found = [(node, m) for node in graph if (m := _match(node)) is not None]
    count = 0
    for old, (query, key, value, merged) in found:
        mask = old.inputs[3] if len(old.inputs) > 3 else None
        tables = [x for p in (query, key.projection) if p.rope is not None for x in p.rope.inputs[1:3]]
        anchor = _anchor(graph, old, key, value, [query.flat, key.projection.flat, value.projection.flat, mask,
                                                  key.past, value.past, *tables])
        if anchor is None:
            continue
        inputs = [_rotated(graph, query, anchor, f"_qc_attention_{count}_rope_q"),
                  _rotated(graph, key.projection, anchor, f"_qc_attention_{count}_rope_k"),
                  value.projection.flat, mask]
        cached = key.past is not None
        presents = cached or any(c.present.is_graph_output() or _other_readers(c) for c in (key, value))
        if cached:
            inputs += [key.past, value.past]
        while inputs[-1] is None:
            inputs.pop()
        attributes = [a for a in old.attributes.values() if a.name not in ("q_num_heads", "kv_num_heads")]
        attention = ir.Node("", "Attention", inputs,
                            [*attributes, ir.AttrInt64("q_num_heads", query.heads),
                             ir.AttrInt64("kv_num_heads", key.projection.heads)],
                            num_outputs=3 if presents else 1, name=f"_qc_attention_{count}")
        graph.insert_before(anchor, [attention])
        replace_keeping_name(merged, attention.outputs[0])
        if len(attention.outputs) == 3:
            replace_keeping_name(key.present, attention.outputs[1])
            replace_keeping_name(value.present, attention.outputs[2])
        count += 1
    return count
