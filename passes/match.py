"""Match: find linear ops in a Dynamo FX graph and decide what each becomes (attention: ``attention``).

A linear op is ``F.linear`` / ``aten.linear`` / ``addmm`` / ``mm`` / ``matmul`` whose weight
operand is a model parameter (directly, or through a 2-D transpose). Its owning module's name
comes from the node's ``nn_module_stack`` (what the user wrote), else from the parameter's source.
Everything else stays in floating point with a recorded reason.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompiler import torch_compat
from qcompiler.calibration.state import prepared_for, stats_for
from qcompiler.errors import CalibrationError
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision, LinearMatch, node_value

aten = torch.ops.aten
# why a linear whose weight the graph also uses elsewhere stays in floating point (the embedding
# pass gives it the embedding's INT8 table when the recipe quantizes embeddings)
TIED = ("weight is tied to a non-linear use (e.g. the input embedding): an INT8 copy would sit beside the "
        "FP32 tensor that use still needs; embedding='int8' stores the tied table once in INT8, "
        "quantize_tied=True quantizes a separate copy")


# ----------------------------------------------------------------------------- parameters


def _source_to_path(source: str) -> str:
    """``L['self']._modules['a']._modules['0']._parameters['w']`` / ``L['self'].a[0].w`` -> ``a.0.w``."""
    s = re.sub(r"^L\[['\"][^'\"]*['\"]\]\.?", "", source)  # the frame's root local: self, fn, ...
    s = re.sub(r"_(?:modules|parameters|buffers)\['([^']*)'\]", r"\1", s)
    s = re.sub(r"\['([^']*)'\]|\[(\d+)\]", lambda m: "." + (m.group(1) or m.group(2)), s)
    return re.sub(r"\.+", ".", s).strip(".")


def _placeholder_to_path(target: str) -> str:
    """``L_self_modules_a_modules_0_parameters_w_`` -> ``a.0.w`` (Dynamo's placeholder naming)."""
    s = re.sub(r"^[lL]_[A-Za-z0-9]+_", "", target).rstrip("_")
    return re.sub(r"(?:^|_)(?:modules|parameters|buffers)_", ".", s).strip(".")


def _get_attr(gm: fx.GraphModule, target: str):
    """``get_attr`` targets are dotted paths in ``torch.export``'s unlifted modules."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def graph_parameters(gm: fx.GraphModule, example_inputs) -> dict:
    """fx.Node -> (qualified name, Parameter) for every node that is a model parameter."""
    params = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, nn.Parameter):
            # Dynamo's grapharg (with the exact source) is only there while the backend runs
            grapharg = node.meta.get("grapharg")
            name = _source_to_path(grapharg.source.name) if grapharg is not None else _placeholder_to_path(node.target)
            params[node] = (name, value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = _get_attr(gm, node.target)
            if isinstance(value, nn.Parameter):
                params[node] = (node.target, value)
    return params


def owning_module(node: fx.Node, fallback: str) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _type = list(stack.values())[-1]
        name = _source_to_path(path)
        if name:
            return name
    return fallback


# ----------------------------------------------------------------------------- patterns

_TRANSPOSES = {torch.t, aten.t.default, aten.transpose.int, aten.permute.default, torch.transpose}


def _is_transpose(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target in ("t", "transpose", "permute")) or \
           (node.op == "call_function" and node.target in _TRANSPOSES) or \
           (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))


def _param_through_transpose(node, params) -> Optional[tuple]:
    """(name, param, transposed, param node) when node is a 2-D parameter or a transpose of one."""
    if not isinstance(node, fx.Node):
        return None
    transposed = _is_transpose(node) and bool(node.args) and node.args[0] in params
    pnode = node.args[0] if transposed else node
    if pnode not in params or params[pnode][1].dim() != 2:
        return None
    name, p = params[pnode]
    return name, p, transposed, pnode


@dataclass(frozen=True)
class LinearPattern:
    """One way a linear op appears in a graph: its targets and how to read (x, w, bias) off it."""

    name: str
    targets: tuple
    operands: Callable          # node -> (x, w_operand, bias) or None
    weight_is_nk: bool          # F.linear takes [N, K]; mm/matmul/addmm take [K, N]


def _linear_operands(n):
    bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    return n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("weight"), bias


def _addmm_operands(n):
    if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1:
        return None
    return n.args[1], n.args[2], n.args[0]


LINEAR_PATTERNS = (
    LinearPattern("linear", (F.linear, torch_compat.C_LINEAR, aten.linear.default), _linear_operands, True),
    LinearPattern("addmm", (torch.addmm, aten.addmm.default), _addmm_operands, False),
    LinearPattern("matmul", (torch.matmul, operator.matmul, torch.mm, aten.mm.default,
                             aten.matmul.default), lambda n: (n.args[0], n.args[1], None), False),
)


def _pattern_of(node: fx.Node) -> Optional[LinearPattern]:
    if node.op == "call_method" and node.target == "matmul":
        return LINEAR_PATTERNS[2]
    if node.op != "call_function":
        return None
    return next((p for p in LINEAR_PATTERNS if node.target in p.targets), None)


def activation_of(node: fx.Node) -> fx.Node:
    """The activation operand of a matched linear node, as the graph has it now (an upstream
    rewrite may have replaced the node that was there when matching)."""
    return _pattern_of(node).operands(node)[0]


def _used_outside_linears(param_node: fx.Node) -> bool:
    """True when the graph also uses this weight in something that is not a linear op (an
    embedding lookup with tied weights, say), directly or through a transpose."""
    def linear_only(user):
        if _is_transpose(user):
            return all(_pattern_of(u) is not None for u in user.users)
        return _pattern_of(user) is not None
    return not all(linear_only(u) for u in param_node.users)


def _bias_ok(bias, params) -> bool:
    return bias is None or (isinstance(bias, fx.Node) and bias in params and params[bias][1].dim() == 1)


# ----------------------------------------------------------------------------- the pass


def assigned_recipe(param, module: str, recipe) -> tuple:
    """(recipe, reason) that calibration's mixed-precision search gave this linear."""
    prepared = prepared_for(param)
    if prepared is None:
        raise CalibrationError(
            f"recipe {recipe.name!r} chooses each layer's format on calibration data, but {module!r} has no "
            f"choice yet: run `qcompiler.calibrate(model, batches, recipe={recipe.name!r})` before compiling")
    return prepared.recipe, prepared.reason


def match(gm: fx.GraphModule, example_inputs, recipe) -> list:
    """Annotate linear nodes with ``LinearMatch`` / ``Decision``; return the matches."""
    params = graph_parameters(gm, example_inputs)
    matches = []
    for node in gm.graph.nodes:
        pattern = _pattern_of(node)
        if pattern is None:
            continue
        operands = pattern.operands(node)
        found = operands and _param_through_transpose(operands[1], params)
        if not found:
            node.meta[META_KEY] = Decision(module=owning_module(node, node.name), op="matmul", scheme=FLOATING_POINT,
                                           reason="no parameter operand (activation x activation)")
            continue
        x, _, bias = operands
        pname, param, transposed, param_node = found
        weight = param if pattern.weight_is_nk != transposed else param.t()
        # calibration saw the full name (named_modules); Dynamo's is relative to the frame's root,
        # which after a graph break inside a submodule is that submodule
        stats = stats_for(param)
        module = stats.module if stats is not None else owning_module(node, pname.rsplit(".", 1)[0])
        x_value = node_value(x) if isinstance(x, fx.Node) else None
        layer_recipe, reason = recipe.for_module(module), ""
        if layer_recipe is not None and layer_recipe.mixed_precision:
            layer_recipe, reason = assigned_recipe(param, module, layer_recipe)
        if layer_recipe is None:
            reason = reason or "kept in floating point by a skip/override pattern"
        elif weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            layer_recipe, reason = None, f"weight dtype {weight.dtype} is not a float type"
        elif not _bias_ok(bias, params):
            layer_recipe, reason = None, "bias is not a 1-D parameter"
        elif x_value is None or x_value.dim() < 1:
            layer_recipe, reason = None, "activation operand is not a tensor of known shape"
        elif not layer_recipe.quantize_tied and _used_outside_linears(param_node):
            layer_recipe, reason = None, TIED
        elif layer_recipe.weight_bits is None:
            layer_recipe, reason = None, f"recipe {layer_recipe.name!r} keeps weights in floating point"
        bias_t = params[bias][1] if isinstance(bias, fx.Node) and bias in params else None
        m = LinearMatch(module, pattern.name, x, weight, param, bias, layer_recipe, reason)
        node.meta[META_KEY] = m
        matches.append((node, m, bias_t))
    return matches
