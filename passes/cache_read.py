"""Attention that reads a quantized KV cache: fuse the cache's read into the attention.

A compiled ``QuantizedKVCache`` layer hands attention ``cat([kv_dequantize(codes, ...), tail])``
for its keys and for its values (``qcompiler.api.kv_cache``), perhaps through transformers'
``repeat_kv`` (``x[:, :, None].expand(...).reshape(...)``, which repeats each KV head for its
query heads). ``fuse(gm, sdpa, args)`` finds that form on both operands of a floating-point
``scaled_dot_product_attention`` and replaces the attention by ``qcompile::attention_quantized_kv``,
which takes the codes, scales and tails themselves: on a target with a fused kernel no
floating-point copy of the cache is made. The numbers do not change (the op's reference is the
dequantize, concatenate and attention it replaces), so the pass runs whatever the recipe.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from qcompiler.ir import ops  # noqa: F401  (defines the qcompile:: ops named here)
from qcompiler.passes.meta import node_value

aten = torch.ops.aten
qops = torch.ops.qcompile

CATS = {torch.cat, aten.cat.default}
EXPANDS = {"expand", aten.expand.default}
RESHAPES = {"reshape", "view", torch.reshape, aten.reshape.default, aten.view.default, aten._unsafe_view.default}
CONTIGUOUS = {"contiguous", aten.clone.default}
_ALL = slice(None, None, None)
DEQUANTIZE = {qops.kv_dequantize, qops.kv_dequantize.default}  # Dynamo records the packet
META_KEY = "qcompile_kv_read"  # node.meta of a fused attention: its cache's scheme (lowerings retarget the node)


@dataclass(frozen=True)
class CacheRead:
    """One operand of an attention that is a quantized cache's read."""

    codes: fx.Node            # the kv_dequantize node
    tail: fx.Node             # the floating-point tail concatenated after it
    chain: tuple              # the nodes from the attention's operand back to the concatenation


def _target(node) -> object:
    return node.target if isinstance(node, fx.Node) and node.op in ("call_function", "call_method") else None


def _is_head_unsqueeze(node: fx.Node) -> bool:
    """``x[:, :, None]`` (with or without trailing full slices), or ``unsqueeze(x, 2)``."""
    if _target(node) is operator.getitem:
        index = node.args[1]
        return (isinstance(index, tuple) and len(index) >= 3 and index[0] == _ALL and index[1] == _ALL
                and index[2] is None and all(i == _ALL or i is Ellipsis for i in index[3:]))
    return _target(node) in ("unsqueeze", aten.unsqueeze.default) and tuple(node.args[1:2]) in ((2,), (-3,))


def _through_repeat_kv(node: fx.Node) -> tuple:
    """(the tensor before ``repeat_kv``, the nodes passed) when ``node`` is ``repeat_kv``'s form;
    (node, ()) when it is not one."""
    chain, x = [], node
    while _target(x) in CONTIGUOUS:
        chain.append(x)
        x = x.args[0]
    if _target(x) not in RESHAPES:
        return node, ()
    chain.append(x)
    x = x.args[0]
    if _target(x) not in EXPANDS:
        return node, ()
    chain.append(x)
    x = x.args[0]
    if not _is_head_unsqueeze(x):
        return node, ()
    chain.append(x)
    return x.args[0], tuple(chain)


def cache_read(operand, per: str) -> Optional[CacheRead]:
    """``operand`` as a quantized cache's read of keys (``per="channel"``) or values (``"token"``)."""
    if not isinstance(operand, fx.Node):
        return None
    cat, chain = _through_repeat_kv(operand)
    if _target(cat) not in CATS:
        return None
    parts = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim not in (-2, 2) or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    codes, tail = parts
    if _target(codes) not in DEQUANTIZE or len(codes.args) < 6 or codes.args[4] != per:
        return None
    before, after = node_value(cat), node_value(operand)
    if chain and (before is None or after is None or after.shape[1] % before.shape[1]):
        return None
    return CacheRead(codes, tail, (*chain, cat))


def _erase_unused(gm: fx.GraphModule, nodes) -> None:
    for n in nodes:
        if not n.users:
            gm.graph.erase_node(n)


def fuse(gm: fx.GraphModule, sdpa: fx.Node, a: dict) -> Optional[fx.Node]:
    """Replace ``sdpa`` (arguments ``a`` in ``scaled_dot_product_attention``'s terms) by
    ``qcompile::attention_quantized_kv`` when its key and value are a quantized cache's reads;
    the new node, or None (the graph untouched)."""
    if a["dropout_p"] not in (0, 0.0):
        return None
    keys, values = cache_read(a["key"], "channel"), cache_read(a["value"], "token")
    if keys is None or values is None:
        return None
    kc, vc = keys.codes.args, values.codes.args  # (codes, scale, offset, scheme, per, group, [dtype])
    if kc[3] != vc[3]:
        return None
    with gm.graph.inserting_before(sdpa):
        new = gm.graph.call_function(qops.attention_quantized_kv.default, (
            a["query"], kc[0], kc[1], kc[2], keys.tail, vc[0], vc[1], vc[2], values.tail, a["attn_mask"],
            bool(a["is_causal"]), a["scale"], kc[3], kc[5], vc[5]))
    new.meta.update(sdpa.meta)
    new.meta[META_KEY] = kc[3]  # the cache's scheme, for explain
    sdpa.replace_all_uses_with(new)
    gm.graph.erase_node(sdpa)
    _erase_unused(gm, (*keys.chain, keys.codes, *values.chain, values.codes))
    return new
