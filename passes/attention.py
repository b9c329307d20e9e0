"""Attention: describe every ``scaled_dot_product_attention`` and every hand-written
``matmul -> scale -> masks -> softmax -> matmul`` (``passes.attention_match``) and, where the recipe
asks (``attention="int8" | "fp8"``), replace it by ``qcompile::attention_q8`` (dynamic scales), or
by ``qcompile::attention_q8_static`` when the recipe's activations are static (calibrated constant
scales, ``passes.attention_static``: the form TensorRT takes; calibration records them for
``scaled_dot_product_attention`` calls, so hand-written attention stays in floating point there).

Each attention gets a ``Decision`` whose text gives its geometry (query heads, head size, the
key/value heads before transformers' ``repeat_kv`` for GQA / MQA, the mask: causal, a boolean or
additive mask, or none) and, when the graph's inputs are real tensors (the call being compiled),
its output SQNR against floating-point attention on those inputs, computed by the reference q-op.
Attention with dropout, or in a form the q-op does not take, stays in floating point with the
reason. Floating-point ``scaled_dot_product_attention`` whose keys and values are a quantized KV
cache's read becomes ``qcompile::attention_quantized_kv`` (``passes.cache_read``), which takes the
cache's codes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from qcompiler import torch_compat
from qcompiler.errors import CalibrationError
from qcompiler.ir.attention import attention_q8_ref
from qcompiler.ir.attention_static import attention_q8_static_ref
from qcompiler.passes import attention_match, attention_static, cache_read
from qcompiler.passes.graph_utils import add_constant, replace_node
from qcompiler.passes.match import owning_module
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision, node_value
from qcompiler.passes.sqnr import sqnr_db

aten = torch.ops.aten
qops = torch.ops.qcompile
# same signature: (query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
SDPA = (F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
# other attention forms a graph may carry: reported, left in floating point
OTHER_ATTENTION = (aten._scaled_dot_product_flash_attention_for_cpu.default,)
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
_REPEATS = {"expand", "reshape", "view", "contiguous", aten.expand.default, aten.view.default,
            aten.reshape.default, aten.clone.default, torch.reshape, aten._unsafe_view.default}
FLOAT_REASON = "attention stays in floating point (recipe field attention=None; 'int8' or 'fp8' quantizes it)"
SKIPPED_REASON = "kept in floating point by a skip/override pattern"
FUSABLE = (FLOAT_REASON, SKIPPED_REASON)  # floating-point attention that may read a quantized KV cache in place
READS_CACHE = "fused with the read of its {} KV cache (qcompile::attention_quantized_kv)"


@dataclass(frozen=True)
class AttentionShape:
    """What ``explain`` says of one attention op."""

    heads: int
    head_dim: int
    kv_heads: int
    mask: str          # "causal", "boolean mask", "additive mask", "causal + ... mask" or "none"

    def text(self) -> str:
        kv = "" if self.kv_heads == self.heads else f", {self.kv_heads} KV heads"
        return f"{self.heads} heads of {self.head_dim}{kv}, mask: {self.mask}"


def sdpa_arguments(node: fx.Node) -> dict:
    args = dict(SDPA_DEFAULTS)
    args.update(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _kv_heads(key: fx.Node, heads: int) -> int:
    """Key/value heads before ``repeat_kv`` (an ``expand`` of ``[B, Hkv, 1, L, D]`` reshaped to ``Hkv * n``)."""
    node = key
    for _ in range(4):
        if not isinstance(node, fx.Node):
            break
        if node.target in ("expand", aten.expand.default) and isinstance(node.args[0], fx.Node):
            value = node_value(node.args[0])
            if value is not None and value.dim() == 5:
                return int(value.shape[1])
        if node.target not in _REPEATS or not node.args:
            break
        node = node.args[0]
    value = node_value(key)
    return int(value.shape[1]) if value is not None and value.dim() == 4 else heads


def handwritten_arguments(m: attention_match.HandWritten) -> dict:
    """A hand-written attention's arguments in ``sdpa_arguments``' terms (the mask: its additive terms)."""
    return dict(SDPA_DEFAULTS, query=m.query, key=m.key, value=m.value, attn_mask=m.mask_terms or None,
                scale=m.scale)


def describe(a: dict) -> Optional[AttentionShape]:
    """The geometry of an attention with arguments ``a`` (``sdpa_arguments``' terms)."""
    q, k = node_value(a["query"]), node_value(a["key"])
    if q is None or k is None or q.dim() != 4:
        return None
    heads = int(q.shape[1])
    kv = int(k.shape[1]) if a["enable_gqa"] else _kv_heads(a["key"], heads)
    mask = a["attn_mask"]
    if isinstance(mask, list):
        kinds = [f"additive mask ({len(mask)} terms)" if len(mask) > 1 else "additive mask"]
    else:
        mask = node_value(mask) if isinstance(mask, fx.Node) else None
        kinds = [] if mask is None else ["boolean mask" if mask.dtype == torch.bool else "additive mask"]
    kinds = (["causal"] if a["is_causal"] else []) + kinds
    return AttentionShape(heads, int(q.shape[-1]), kv, " + ".join(kinds) or "none")


def _unsupported(a: dict) -> str:
    if a["dropout_p"] not in (0, 0.0):
        return f"dropout_p={a['dropout_p']} (training-time attention dropout)"
    for name in ("query", "key", "value"):
        v = node_value(a[name]) if isinstance(a[name], fx.Node) else None
        if v is None or v.dim() != 4 or not v.is_floating_point():
            return f"{name} is not a 4-D floating-point tensor of known shape"
    q, k = node_value(a["query"]), node_value(a["key"])
    if isinstance(q.shape[1], int) and isinstance(k.shape[1], int) and q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads"
    mask = a["attn_mask"]
    if mask is not None and not (isinstance(mask, fx.Node) or isinstance(mask, list)):
        return "the mask is not a tensor"
    return ""


def _mutates(gm: fx.GraphModule) -> bool:
    """Whether the graph writes in place (a static KV cache's ``index_copy_``): replaying it to
    measure would apply the write twice, so such graphs are not replayed."""
    for n in gm.graph.nodes:
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        in_place = name.split(".")[0].endswith("_") and not name.startswith("_")
        if n.op in ("call_function", "call_method") and in_place and \
                getattr(n.target, "__module__", None) != "_operator":  # operator.and_ is not in place
            return True
    return False


def _sqnr_inputs(gm: fx.GraphModule, example_inputs, wanted: dict) -> dict:
    """anchor node -> (q, k, v, mask, scale) on the call being compiled, when its inputs are real
    tensors (``wanted``: anchor -> its arguments; a list of additive mask terms is summed)."""
    if not wanted or any(torch_compat.is_fake(x) for x in example_inputs) or _mutates(gm):
        return {}
    seen, kept = {}, {}
    needed = {x for a in wanted.values() for name in ("query", "key", "value", "attn_mask")
              for x in (a[name] if isinstance(a[name], list) else [a[name]]) if isinstance(x, fx.Node)}

    class Recorder(fx.Interpreter):
        def value(self, x):  # the interpreter frees a value after its last use: read what was kept
            if isinstance(x, list):
                return sum(kept[t] for t in x)
            return kept[x] if isinstance(x, fx.Node) else x

        def run_node(self, n):
            if n in wanted:  # before the anchor runs: an in-place op there could not change its inputs
                a = wanted[n]
                seen[n] = tuple(self.value(a[x]) for x in ("query", "key", "value", "attn_mask", "scale"))
            out = super().run_node(n)
            if n in needed:
                kept[n] = out
            return out

    try:
        with torch.no_grad():
            Recorder(gm).run(*example_inputs)
    except Exception:  # a graph the interpreter cannot replay (symbolic sizes, ...): no SQNR, no error
        return {}
    return seen


def _sqnr(values, a: dict, qdtype, static: Optional[attention_static.StaticAttention]) -> Optional[float]:
    q, k, v, mask, scale = values
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=a["is_causal"],
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if static is None:
        got = attention_q8_ref(q, k, v, mask, a["is_causal"], scale, qdtype)
    else:
        got = attention_q8_static_ref(q, k, v, mask, a["is_causal"], scale, *static.tensors(), qdtype)
    live = torch.isfinite(ref).all(dim=-1)  # rows with every key masked carry no meaning
    return sqnr_db(ref[live], got.float()[live]) if live.any() else None


def _static_constants(a: dict, module: str, layer, state) -> attention_static.StaticAttention:
    """The calibrated constants of a static attention (arguments ``a``), on its query's device."""
    stats = attention_static.find_stats(state, module)
    if stats is None:
        raise CalibrationError(
            f"recipe {layer.name!r} quantizes attention with static (calibrated) scales, but attention "
            f"{module!r} has no calibration statistics: run `with qcompiler.calibrate(model): model(batch)` on "
            f"representative batches before the first call (or load a state saved after calibrating)")
    q, k, v = (node_value(a[x]) for x in ("query", "key", "value"))
    if not attention_static.fits(stats, q, k, v):
        raise CalibrationError(
            f"attention {module!r} was calibrated on query/key/value heads and sizes "
            f"{tuple(stats.q_absmax.shape)}/{tuple(stats.k_sum.shape)}/{tuple(stats.v_absmax.shape)}, but this "
            f"graph has {(q.shape[1], q.shape[-1])}/{(k.shape[1], k.shape[-1])}/{(v.shape[1], v.shape[-1])}: "
            f"calibrate this model again")
    c = attention_static.constants(attention_static.regrouped(stats, k.shape[1]), layer.attention_qdtype)
    return attention_static.StaticAttention(*(t.to(q.device) for t in c.tensors()))


STATIC_HANDWRITTEN = ("static attention's constants come from calibration, which records scaled_dot_product_attention "
                      "calls only: load the model with attn_implementation='sdpa', or use a dynamic recipe")


def _candidates(gm: fx.GraphModule) -> list:
    """``(anchor node, arguments in sdpa_arguments' terms or None, hand-written match or None)``
    for every attention of the graph, in graph order."""
    handwritten = {m.output: m for m in attention_match.find_handwritten(gm)}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA:
            out.append((node, sdpa_arguments(node), None))
        elif node.op == "call_function" and node.target in OTHER_ATTENTION:
            out.append((node, None, None))
        elif node in handwritten:
            out.append((node, handwritten_arguments(handwritten[node]), handwritten[node]))
    return out


def _combined_mask(gm: fx.GraphModule, mask):
    """The mask argument of the q-op: a node, or the sum of a hand-written attention's terms."""
    if not isinstance(mask, list):
        return mask
    total = mask[0]
    for term in mask[1:]:
        total = gm.graph.call_function(operator.add, (total, term))
    return total


def quantize_attention(gm: fx.GraphModule, example_inputs, recipe, state=None) -> list:
    """Describe every attention; rewrite the ones the recipe quantizes (``state``: the model's
    ``QuantState``, whose attention statistics static recipes need). Returns their Decisions."""
    plan = []
    for node, a, hand in _candidates(gm):
        module = owning_module(node, node.name)
        layer = recipe.for_module(module)
        shape = describe(a) if a is not None else None
        geometry = ("hand-written; " if hand else "") + (f"{shape.text()}; " if shape else "")
        if a is None:
            why = "an attention form qcompile does not quantize (only scaled_dot_product_attention)"
        elif layer is None:
            why = SKIPPED_REASON
        elif layer.attention is None:
            why = FLOAT_REASON
        else:
            why = (hand.reason if hand else "") or _unsupported(a)
            if not why and hand and layer.activation == "static":
                why = STATIC_HANDWRITTEN
        plan.append((node, a, hand, module, layer, geometry, why))
    measured = _sqnr_inputs(gm, example_inputs, {n: a for n, a, _, _, _, _, why in plan if not why})
    decisions, changed = [], False
    for node, a, hand, module, layer, geometry, why in plan:
        if why:
            fused = cache_read.fuse(gm, node, a) if a is not None and not hand and why in FUSABLE else None
            text = geometry + why + (f"; {READS_CACHE.format(fused.args[12])}" if fused is not None else "")
            d = Decision(module=module, op="attention", scheme=FLOATING_POINT, reason=text)
            (fused or node).meta[META_KEY] = d
            decisions.append(d)
            changed |= fused is not None
            continue
        qdtype = layer.attention_qdtype
        static = _static_constants(a, module, layer, state) if layer.activation == "static" else None
        sqnr = _sqnr(measured[node], a, qdtype, static) if node in measured else None
        pv = "INT8" if layer.attention == "int8" else "FP8"
        with gm.graph.inserting_before(node):
            common = (a["query"], a["key"], a["value"], _combined_mask(gm, a["attn_mask"]), bool(a["is_causal"]),
                      a["scale"])
            if static is None:
                new = gm.graph.call_function(qops.attention_q8.default, (*common, qdtype))
                text = (f"{geometry}INT8 Q and K per token (K smoothed), softmax in FP32, {pv} P (per 64-key "
                        f"block) and V (per channel)")
            else:
                names = ("q_mul", "k_shift", "k_mul", "q_scale", "k_scale", "v_scale", "p_scale")
                consts = tuple(add_constant(gm, t, f"attn_{n}") for n, t in zip(names, static.tensors()))
                new = gm.graph.call_function(qops.attention_q8_static.default, (*common, *consts, qdtype))
                text = (f"{geometry}static: INT8 Q and K per tensor (calibrated smoothing and K shift), softmax "
                        f"in FP32, {pv} P (fixed scale) and V (per tensor)")
        replace_node(gm, node, new)
        if hand:
            attention_match.remove_chain(gm, hand)
        scheme = f"attention-{layer.attention}" + ("-static" if static is not None else "")
        d = Decision(module=module, op="attention", scheme=scheme, reason=text, sqnr_db=sqnr)
        new.meta[META_KEY] = d
        decisions.append(d)
    if changed or any(d.scheme != FLOATING_POINT for d in decisions):
        gm.graph.lint()
        gm.recompile()
    return decisions
