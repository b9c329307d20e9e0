"""The exporter's type promotion, run only where a traced graph needs a cast.

``torch.onnx``'s ``insert_type_promotion_nodes`` interprets every node of a traced program through
fake tensors once more to find the arguments whose dtype an op's promotion rule would change
(an ``int64`` tensor added to a ``float32`` one, a Python float times an integer tensor); with
symbolic batch and sequence sizes that costs seconds for a language model, and a q-op graph
usually has no such argument. ``promotions`` applies the same rule table to the dtypes the trace
already stored in each node's ``meta["val"]``; ``promote_types`` runs the exporter's pass only
where it names a node, or where it cannot tell (a value it has no dtype for, a table it cannot
import), so the graph the translation sees is the one the pass would have left.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from torch import fx

# (module, attribute): the exporter's rule table and its scalar dtypes
_RULES = ("torch.onnx._internal.fx.passes.type_promotion", ("TypePromotionTable", "get_type_promotion_rule"))
_TYPES = ("torch.onnx._internal.fx.type_utils", ("from_scalar_type_to_torch_dtype",))


class _Unknown(Exception):
    """An argument the check has no dtype for: the exporter's pass decides."""


def _load():
    found = []
    for module_name, attributes in (_RULES, _TYPES):
        module = importlib.import_module(module_name)
        found.extend(getattr(module, a) for a in attributes)
    return found


def _value(arg):
    if isinstance(arg, fx.Node):
        if "val" not in arg.meta:
            raise _Unknown(arg.name)
        return arg.meta["val"]
    return arg


def _casts(arg, dtype: Optional[torch.dtype], scalar_dtype: Callable) -> bool:
    """Whether the exporter's pass would cast ``arg`` to ``dtype`` (its ``_maybe_promote_arg``)."""
    if dtype is None:
        return False
    if isinstance(arg, (tuple, list)):
        return any(_casts(a, dtype, scalar_dtype) for a in arg)
    value = _value(arg)
    if isinstance(value, torch.Tensor):
        return value.dtype != dtype
    if isinstance(arg, fx.Node) and not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _Unknown(arg.name)
    equivalent = scalar_dtype(type(value))
    if equivalent is None:
        raise _Unknown(repr(value))
    return equivalent != dtype


def promotions(gm: fx.GraphModule) -> Optional[list]:
    """The nodes of ``gm`` (and its nested graphs) whose arguments the exporter's type promotion
    would cast, by name; None where that cannot be told without running the pass."""
    try:
        table_type, rule_of, scalar_dtype = _load()
    except (ImportError, AttributeError):
        return None
    table = table_type()
    found = []
    try:
        for module in gm.modules():
            if not isinstance(module, fx.GraphModule):
                return None
            for node in module.graph.nodes:
                if node.op != "call_function" or (rule := rule_of(node, table)) is None:
                    continue
                args = fx.node.map_arg(node.args, _value)
                kwargs = fx.node.map_arg(node.kwargs, _value)
                info = rule.preview_type_promotion(args, kwargs)
                if (any(_casts(a, info.args_dtypes.get(i), scalar_dtype) for i, a in enumerate(node.args))
                        or any(_casts(a, info.kwargs_dtypes.get(k), scalar_dtype) for k, a in node.kwargs.items())):
                    found.append(node.name)
    except _Unknown:
        return None
    return found


def promote_types(gm: fx.GraphModule, insert_type_promotion_nodes: Callable) -> bool:
    """Run the exporter's ``insert_type_promotion_nodes`` on ``gm`` unless ``promotions`` finds
    nothing to cast; True when it ran."""
    if promotions(gm) == []:
        return False
    insert_type_promotion_nodes(gm)
    return True


__all__ = ["promote_types", "promotions"]
