"""Smooth: SmoothQuant / AWQ scales (and static clip ranges) for the linears of recipes that ask.

Linears reading the same activation form a group (q/k/v; gate/up) and share one scale
``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` (W over the whole group), so the activation is
divided once. ``1/s`` is folded into the producer (an RMSNorm/LayerNorm weight, or any
multiplication by a 1-D parameter) when every consumer of the producer is in the group; otherwise
the quantize pass applies it inside the activation-quantize op. The weights absorb ``s`` in the
quantize pass. ``alpha="auto"`` / ``clip="auto"`` pick, per group, the alpha on ``recipe.alpha_grid`` and
the static activation clip on ``recipe.clip_grid`` with the smallest output error of the
group's quantized linears on the calibration rows.

AWQ's scales are chosen at calibration (``qcompiler.algorithms.awq``) and only folded here, the same way.

The user's parameters are never touched: folded norm weights are new graph constants.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qcompiler.calibration.observers import static_scale
from qcompiler.calibration.state import stats_for
from qcompiler.errors import CalibrationError
from qcompiler.ir.ops import (dequantize_blocks, quantize_per_block_ref, quantize_per_channel_ref,
                              quantize_per_tensor_ref, quantize_per_token_ref)
from qcompiler.passes.graph_utils import add_constant
from qcompiler.passes.match import graph_parameters, owning_module
from qcompiler.passes.meta import ActivationPlan, node_value
from qcompiler.passes.prepared import checked_prepared
from qcompiler.schemes.per_block_8bit import ACT_BLOCK

aten = torch.ops.aten
_MIN = 1e-5  # as in the SmoothQuant reference code: keeps s finite for dead channels
SEARCH_ROWS = 512  # calibration rows each search candidate is scored on


def smooth_scale(act_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel."""
    s = act_absmax.clamp_min(_MIN).pow(alpha) / weight_absmax.clamp_min(_MIN).pow(1 - alpha)
    return s.clamp_min(_MIN).to(torch.float32)


def fake_quant_activation(x: Tensor, smooth_inv: Optional[Tensor], stats, recipe, clip: float = 1.0) -> Tensor:
    """What the recipe's activation quantizer turns ``x`` into, dequantized (for searches)."""
    if recipe.activation == "dynamic":
        q, scale = quantize_per_token_ref(x, smooth_inv, recipe.qdtype)
        return q.float() * scale
    if recipe.activation == "blocks":
        q, scale = quantize_per_block_ref(x, ACT_BLOCK, smooth_inv, recipe.qdtype)
        return dequantize_blocks(q, scale, ACT_BLOCK)
    scale = static_scale(stats, smooth_inv, recipe, clip)
    return quantize_per_tensor_ref(x, scale, smooth_inv, recipe.qdtype).float() * scale


def group_error(weights: list, stats, recipe, s: Optional[Tensor], clip: float = 1.0) -> float:
    """Sum over the group of ||Q(X/s) Q(W s)^T - X W^T||^2 / ||X W^T||^2 on the calibration rows."""
    x = stats.rows[:SEARCH_ROWS]
    x_hat = fake_quant_activation(x, None if s is None else 1.0 / s, stats, recipe, clip)
    err = 0.0
    for w in weights:
        wq, ws = quantize_per_channel_ref(w if s is None else w * s, recipe.qdtype)
        y = x @ w.t()
        y_hat = x_hat @ (wq.float() * ws[:, None]).t()
        err += ((y_hat - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)).item()
    return err


def choose(weights: list, stats, recipe, scaled: bool = True) -> tuple:
    """(alpha or None, clip) for a group: the recipe's values, or searched where it says "auto".
    ``scaled=False`` (a member in ``recipe.smooth_skip``): no SmoothQuant scale, alpha None.

    The search is a coordinate descent on the group's output error: alpha at the first clip
    candidate, then clip at that alpha, then alpha again at that clip. Results are cached on the
    statistics, so a recompile (new shapes, grad mode) does not search again.
    """
    smooths = recipe.smoothquant and scaled
    if (recipe.alpha != "auto" or not smooths) and recipe.clip != "auto":
        return (float(recipe.alpha) if smooths else None), float(recipe.clip)
    key = ("alpha-clip", recipe, smooths, tuple(w.shape for w in weights), float(torch.cat(weights).abs().sum()))
    if key not in stats.searches:
        stats.searches[key] = _search(weights, stats, recipe, smooths)
    return stats.searches[key]


def _search(weights: list, stats, recipe, smooths: bool) -> tuple:
    w_absmax = torch.cat(weights).abs().amax(dim=0)
    alphas = [None] if not smooths else \
        (list(recipe.alpha_grid) if recipe.alpha == "auto" else [float(recipe.alpha)])
    clips = list(recipe.clip_grid) if recipe.clip == "auto" else [float(recipe.clip)]
    errors = {}

    def err(a, c):
        if (a, c) not in errors:
            s = None if a is None else smooth_scale(stats.channel_absmax, w_absmax, a)
            errors[(a, c)] = group_error(weights, stats, recipe, s, c)
        return errors[(a, c)]

    alpha = min(alphas, key=lambda a: err(a, clips[0]))
    clip = min(clips, key=lambda c: err(alpha, c))
    alpha = min(alphas, key=lambda a: err(a, clip))
    return alpha, clip


# ----------------------------------------------------------------------------- folding

_LAYER_NORMS = (F.layer_norm, torch.layer_norm, aten.layer_norm.default)
_RMS_NORMS = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None),
                               getattr(aten, "rms_norm", None) and aten.rms_norm.default) if f is not None)
_MULS = (operator.mul, torch.mul, aten.mul.Tensor)


def _keeps_last_dim(node: fx.Node) -> bool:
    """A view that only slices leading dimensions (lm_head's ``hidden[:, -k:, :]``; ``torch.export``
    writes it as ``aten.alias`` or ``aten.slice``)."""
    if node.op != "call_function":
        return False
    if node.target is aten.alias.default:
        return True
    if node.target is aten.slice.Tensor:
        value = node_value(node)
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return value is not None and dim % value.dim() != value.dim() - 1
    if node.target is not operator.getitem:
        return False
    idx = node.args[1]
    return isinstance(idx, tuple) and len(idx) > 0 and idx[-1] == slice(None) and Ellipsis not in idx


def _per_channel_operands(producer: fx.Node, params: dict, k: int) -> Optional[dict]:
    """{arg position or kwarg name: (qualified name, Parameter)} of the producer's operands that scale
    its output channels."""
    def param1d(a):
        return a in params and params[a][1].dim() == 1 and params[a][1].shape[0] == k

    if producer.op == "call_function" and producer.target in _MULS:
        hits = {i: params[a] for i, a in enumerate(producer.args[:2]) if isinstance(a, fx.Node) and param1d(a)}
        return hits if len(hits) == 1 else None
    if producer.op == "call_function" and producer.target in _LAYER_NORMS + _RMS_NORMS:
        slots = {"weight": 2, "bias": 3} if producer.target in _LAYER_NORMS else {"weight": 2}
        found = {}
        for key, pos in slots.items():
            a = producer.args[pos] if len(producer.args) > pos else producer.kwargs.get(key)
            if a is None:
                continue
            if not (isinstance(a, fx.Node) and param1d(a)):
                return None
            found[pos if len(producer.args) > pos else key] = params[a]
        return found if "weight" in found or 2 in found else None
    return None


def fold(gm: fx.GraphModule, x: fx.Node, group_nodes: set, s: Tensor, params: dict) -> Optional[tuple]:
    """Fold 1/s into x's producer if every consumer is in the group; return (the producer's name,
    the qualified names of the parameters divided by s), or None."""
    producer = x.args[0] if _keeps_last_dim(x) and len(x.users) else x
    if producer is not x and set(producer.users) != {x}:
        return None
    if not set(x.users) <= group_nodes:
        return None
    operands = _per_channel_operands(producer, params, s.shape[0]) if isinstance(producer, fx.Node) else None
    if not operands:
        return None
    for slot, (_, param) in operands.items():
        with gm.graph.inserting_before(producer):
            const = add_constant(gm, folded_parameter(param, s), "smoothed_norm")
        if isinstance(slot, int):
            producer.update_arg(slot, const)
        else:
            producer.update_kwarg(slot, const)
    return owning_module(producer, producer.name), tuple(name for name, _ in operands.values())


def producing_linear(x: fx.Node, group_nodes: set, linears: set) -> Optional[fx.Node]:
    """The linear node (one of ``linears``) whose output rows could absorb the group's ``1/s``
    instead of the in-op division: ``x = a * L(...)`` (a gated MLP's ``act(gate) * up``), where
    L's output feeds only that product and the product only the group; None otherwise. The
    passes divide in the activation quantize op; a format with nowhere for ``1/s`` (a checkpoint)
    folds it into L's weight rows and bias, which scales L's per-row quantization scales alike."""
    if x.op != "call_function" or x.target not in _MULS or not set(x.users) <= group_nodes:
        return None
    hits = [a for a in x.args[:2] if isinstance(a, fx.Node) and a in linears and set(a.users) == {x}]
    return hits[0] if len(hits) == 1 and x.args[0] is not x.args[1] else None


def folded_parameter(param: Tensor, s: Tensor) -> Tensor:
    """A producer's per-channel parameter with 1/s folded in (in its own dtype)."""
    return (param.detach().to(torch.float32) / s).to(param.dtype)


# ----------------------------------------------------------------------------- the pass


def _needs_plan(recipe) -> bool:
    return recipe is not None and (recipe.smoothquant or recipe.clip == "auto" or _awq(recipe))


def _awq(recipe) -> bool:
    return recipe.awq_scales


def _awq_plans(gm, x, members, params) -> dict:
    """AWQ's scales were chosen at calibration (one per group of linears reading x): fold them."""
    scales = [checked_prepared(m, m.recipe).smooth_scale for _, m in members]
    shared = all(s is scales[0] for s in scales)  # the group calibration saw is the group here
    folded = fold(gm, x, {node for node, _ in members}, scales[0], params) \
        if shared and scales[0] is not None else None
    return {node: ActivationPlan(s, None, *(folded or (None, ()))) for (node, _), s in zip(members, scales)}


def smooth(gm: fx.GraphModule, example_inputs, matches: list) -> dict:
    """An ``ActivationPlan`` for every matched linear whose recipe smooths or searches a clip."""
    groups = defaultdict(list)
    for node, m, _bias in matches:
        if _needs_plan(m.recipe):
            groups[(m.x, m.recipe)].append((node, m))
    if not groups:
        return {}
    params = graph_parameters(gm, example_inputs)
    plans = {}
    for (x, recipe), members in groups.items():
        if _awq(recipe):
            plans.update(_awq_plans(gm, x, members, params))
            continue
        stats = stats_for(members[0][1].param)
        if stats is None:
            raise CalibrationError(
                f"recipe {recipe.name!r} needs calibration statistics (SmoothQuant scales or a clip "
                f"search), but {members[0][1].module!r} has none: run `with qcompiler.calibrate(model): "
                f"model(batch)` on representative data before the first call (or use recipe 'w8a8', "
                f"which needs none)")
        weights = [m.weight.detach().to(torch.float32) for _, m in members]
        stats = stats.to(weights[0].device)  # compile-time math runs beside the weights
        alpha, clip = choose(weights, stats, recipe, not any(recipe.smooth_skipped(m.module) for _, m in members))
        s, folded = None, None
        if alpha is not None:
            s = smooth_scale(stats.channel_absmax, torch.cat(weights).abs().amax(dim=0), alpha)
            folded = fold(gm, x, {node for node, _ in members}, s, params)
        for node, _ in members:
            plans[node] = ActivationPlan(s, alpha, *(folded or (None, ())), clip=clip)
    return plans
