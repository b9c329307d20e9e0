"""Quantize: replace each chosen linear by q-ops, weights quantized and packed once, here.

Per recipe (``SCHEMES``: weight bits x activation scheme) the linear ``y = x W^T + b`` becomes
  * 8-bit weight-only: ``linear_w8a16(x, Wq, sw, b)``
  * dynamic:     ``xq, sx = quantize_per_token(x, 1/s)``; ``linear_w8a8(xq, sx, Wq, sw, b)``
  * static:      ``xq = quantize_per_tensor(x, sx, 1/s)``; ``linear_w8a8(xq, sx, Wq, sw, b)``
  * INT4 weight-only: ``linear_w4a16(x, W4, s4, z4, 1/s, group, b)``
with ``Wq, sw = quantize_per_channel(W * s)`` in INT8 or FP8 (``s = 1`` without SmoothQuant or AWQ;
``1/s`` omitted when the smooth pass folded it into the producer); INT4 weights come from
round-to-nearest here or from AWQ / GPTQ at calibration (``qcompiler.algorithms.rounding``). Every rewritten node gets a ``Decision``
with the layer's output SQNR against FP32 on the calibration rows, computed by the reference
q-ops themselves.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, fx

from qcompiler.calibration.observers import static_scale
from qcompiler.calibration.state import prepared_for, stats_for
from qcompiler.errors import CalibrationError
from qcompiler.ir import int4, ops
from qcompiler.passes.graph_utils import add_constant, replace_node
from qcompiler.passes.match import activation_of
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision, node_value

qops = torch.ops.qcompile
WEIGHT_ONLY = "w8a16"  # what a layer whose activations failed a guard runs as, when its weights pass
SQNR_ROWS = 256  # enough rows for a stable dB figure, few enough to keep compile time short


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); +inf when exact, NaN never passes silently."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return float("nan")
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def token_sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """SQNR with every row (token) weighted alike: -10 log10 of the mean over rows of
    |ref_r - approx_r|^2 / |ref_r|^2. Unlike ``sqnr_db`` it does not let a few large tokens hide
    what happens to the others (the next LayerNorm gives every token the same weight)."""
    ref, approx = ref.double().flatten(0, -2), approx.double().flatten(0, -2)
    rel = (ref - approx).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-300)
    mean = rel.mean().item()
    if math.isnan(mean):
        return float("nan")
    return float("inf") if mean == 0 else -10 * math.log10(mean)


def checked_static_scale(stats, smooth_inv: Optional[Tensor], recipe, module: str, clip: float) -> Tensor:
    if stats is None:
        raise CalibrationError(
            f"recipe {recipe.name!r} quantizes activations with static scales, but {module!r} has no "
            f"calibration statistics: run `with qcompiler.calibrate(model): model(batch)` on "
            f"representative data before the first call, or use the dynamic recipe 'w8a8'")
    return static_scale(stats, smooth_inv, recipe, clip)


# ----------------------------------------------------------------------------- schemes


@dataclass(frozen=True)
class Scheme:
    """How one kind of quantized linear is built; ``SCHEMES`` maps a recipe to one of these.

    ``weights(w, recipe, prepared)`` -> named constants (``w`` is float32 [N, K], already
    multiplied by any smoothing scale s; ``prepared`` a calibration-time ``PreparedWeight``);
    ``reference(x, c, bias, smooth_inv, x_scale, recipe)`` -> the layer on float rows through the
    reference q-ops (for the SQNR); ``emit(g, x, c, bias, inv, x_scale, recipe, out_dtype)`` ->
    the node replacing the linear (``c`` and ``inv``, ``x_scale`` are graph nodes there).
    """

    weights: Callable
    reference: Callable
    emit: Callable
    text: Callable


def _w8_weights(w, recipe, prepared):
    wq, ws = ops.quantize_per_channel_ref(w, recipe.qdtype)
    return {"wq": wq, "wscale": ws}


def _w4_weights(w, recipe, prepared):
    if prepared is not None and prepared.weight is not None:
        p = prepared.weight
    else:
        p = int4.quantize(w, recipe.group_size, recipe.symmetric)
    return {"w4": p.packed, "w4scale": p.scale, **({"w4zero": p.zero} if p.zero is not None else {})}


def _w4_args(c):
    return c["w4"], c["w4scale"], c.get("w4zero")


SCHEMES = {
    # (weight_bits, activation) -> Scheme
    (8, None): Scheme(
        _w8_weights,
        lambda x, c, b, inv, xs, r: ops.linear_w8a16_ref(x, c["wq"], c["wscale"], b),
        lambda g, x, c, b, inv, xs, r, dt: g.call_function(qops.linear_w8a16.default, (x, c["wq"], c["wscale"], b)),
        lambda r: "INT8 weights per channel, weights only"),
    (8, "dynamic"): Scheme(
        _w8_weights,
        lambda x, c, b, inv, xs, r: ops.linear_w8a8_ref(*ops.quantize_per_token_ref(x, inv, r.qdtype),
                                                        c["wq"], c["wscale"], b, torch.float32),
        lambda g, x, c, b, inv, xs, r, dt: _emit_dynamic(g, x, c, b, inv, r, dt),
        lambda r: f"{_fmt(r)} weights per channel, {_fmt(r)} activations per token"),
    (8, "static"): Scheme(
        _w8_weights,
        lambda x, c, b, inv, xs, r: ops.linear_w8a8_ref(ops.quantize_per_tensor_ref(x, xs, inv, r.qdtype), xs,
                                                        c["wq"], c["wscale"], b, torch.float32),
        lambda g, x, c, b, inv, xs, r, dt: _emit_static(g, x, c, b, inv, xs, r, dt),
        lambda r: f"{_fmt(r)} weights per channel, {_fmt(r)} activations per tensor ({r.observer})"),
    (4, None): Scheme(
        _w4_weights,
        lambda x, c, b, inv, xs, r: ops.linear_w4a16_ref(x, *_w4_args(c), inv, r.group_size, b),
        lambda g, x, c, b, inv, xs, r, dt: g.call_function(qops.linear_w4a16.default, (
            x, *_w4_args(c), inv, r.group_size, b)),
        lambda r: f"INT4 weights, group {r.group_size}, {'symmetric' if r.symmetric else 'asymmetric'}, "
                  f"{r.algorithm.upper()}"),
}


def _fmt(recipe) -> str:
    return "FP8" if recipe.number_format == "fp8" else "INT8"


def _emit_dynamic(g, x, c, bias, inv, recipe, out_dtype):
    q = g.call_function(qops.quantize_per_token.default, (x, inv, recipe.qdtype))
    xq, sx = g.call_function(operator.getitem, (q, 0)), g.call_function(operator.getitem, (q, 1))
    return g.call_function(qops.linear_w8a8.default, (xq, sx, c["wq"], c["wscale"], bias, out_dtype))


def _emit_static(g, x, c, bias, inv, x_scale, recipe, out_dtype):
    """The static linear, plus each input row's NaN carrier: a calibrated scale saturates NaN and
    Inf to finite codes, where the floating-point linear (and the per-token scale) gives the row
    NaN or Inf. ``(x - x).sum(-1)`` is exactly 0 for a finite row (no overflow, whatever the dtype)
    and NaN for a row holding NaN or Inf; added to the output, it carries that row's fault."""
    xq = g.call_function(qops.quantize_per_tensor.default, (x, x_scale, inv, recipe.qdtype))
    y = g.call_function(qops.linear_w8a8.default, (xq, x_scale, c["wq"], c["wscale"], bias, out_dtype))
    carrier = g.call_function(torch.sum, (g.call_function(torch.sub, (x, x)),), {"dim": -1, "keepdim": True})
    return g.call_function(torch.add, (y, carrier))


def scheme_for(recipe) -> Scheme:
    return SCHEMES[(recipe.weight_bits, recipe.activation)]


def checked_prepared(m, recipe):
    """The calibration-time weight of an AWQ / GPTQ layer, checked against the recipe."""
    if not recipe.calibrated_rounding:
        return None
    prepared = prepared_for(m.param)
    fix = (f"run `qcompiler.calibrate(model, batches, recipe={recipe.name!r})` (with the same recipe "
           f"options) before compiling")
    if prepared is None or prepared.weight is None:
        raise CalibrationError(f"recipe {recipe.name!r} rounds weights with {recipe.algorithm.upper()} on "
                               f"calibration data, but {m.module!r} has no prepared weight: {fix}")
    if prepared.key != recipe.prepared_key:
        raise CalibrationError(f"{m.module!r} was calibrated for a different INT4 setting {prepared.key} "
                               f"than the recipe asks for {recipe.prepared_key}: {fix}")
    return prepared


def _kept_in_float(recipe, sqnr: Optional[float], static_loss: Optional[float]) -> tuple:
    """(the ``FALLBACKS`` key, the reason) when a linear measured on the calibration rows stays in
    floating point, else (None, ""): its SQNR is below ``min_sqnr_db``, or its static activation
    scale loses more than ``max_static_loss_db`` of per-token SQNR against per-token scales (tokens
    whose ranges differ by orders of magnitude, which one per-tensor scale cannot serve)."""
    if sqnr is None:
        return None, ""
    if math.isnan(sqnr):
        return "nan", f"{recipe.name}: the quantized output on the calibration data is NaN"
    floor = recipe.min_sqnr_db
    if floor is not None and sqnr < floor:
        return "min_sqnr_db", (f"{recipe.name}: output SQNR {sqnr:.1f} dB on the calibration data is below "
                               f"min_sqnr_db={floor:g}")
    limit = recipe.max_static_loss_db
    if limit is not None and static_loss is not None and static_loss > limit:
        return "max_static_loss_db", (f"{recipe.name}: its static activation scale loses {static_loss:.1f} dB of "
                                      f"per-token SQNR on the calibration data against per-token scales "
                                      f"(max_static_loss_db={limit:g})")
    return None, ""


def _weight_only(m, recipe, plan, stats, bias, why: str):
    """(constants, SQNR, text) of the linear with 8-bit weights and floating-point activations,
    when activation quantization failed a guard; None when that too misses ``min_sqnr_db``.

    A smoothing scale folded into the producer stays (the input arrives divided by s, the weight
    is W * s); one that would be applied in the activation quantize step is dropped (raw W)."""
    folded = plan is not None and plan.scale is not None and plan.folded_into
    weight = m.weight.detach().to(torch.float32) * (plan.scale if folded else 1.0)
    wq, wscale = ops.quantize_per_channel_ref(weight, torch.int8)  # INT8: every target's weight-only kernel
    consts = {"wq": wq, "wscale": wscale}
    rows = stats.rows[:SQNR_ROWS]
    b = None if bias is None else bias.detach().to(torch.float32)
    ref = torch.nn.functional.linear(rows, m.weight.detach().to(torch.float32), b)
    x = rows / plan.scale if folded else rows
    sqnr = sqnr_db(ref, ops.linear_w8a16_ref(x, consts["wq"], consts["wscale"], b))
    if math.isnan(sqnr) or (recipe.min_sqnr_db is not None and sqnr < recipe.min_sqnr_db):
        return None
    text = "INT8 weights per channel, activations in floating point (weights only): " + why.split(": ", 1)[-1]
    return consts, sqnr, text


def quantize(gm: fx.GraphModule, matches: list, plans: dict) -> list:
    """Rewrite matched linears into q-ops; return one ``Decision`` per matched linear."""
    decisions = []
    for node, m, bias in matches:
        n_out, k_in = m.weight.shape
        fp32_bytes = n_out * k_in * 4
        if m.recipe is None:
            d = Decision(m.module, "linear", FLOATING_POINT, m.reason, weight_bytes_fp32=fp32_bytes,
                         weight_bytes_quantized=fp32_bytes, param_id=id(m.param))
            node.meta[META_KEY] = d
            decisions.append(d)
            continue
        recipe, plan = m.recipe, plans.get(node)
        scheme = scheme_for(recipe)
        prepared = checked_prepared(m, recipe)
        weight = m.weight.detach().to(torch.float32)
        smoothed = plan is not None and plan.scale is not None
        smooth_inv = 1.0 / plan.scale if smoothed else None               # on raw activations
        clip = plan.clip if plan is not None else float(recipe.clip)
        if smoothed:
            weight = weight * plan.scale
        consts = scheme.weights(weight, recipe, prepared)
        stats = stats_for(m.param)
        stats = None if stats is None else stats.to(weight.device)  # math beside the weights
        x_scale = checked_static_scale(stats, smooth_inv, recipe, m.module, clip) if recipe.activation == "static" else None
        in_graph_inv = None if not smoothed or plan.folded_into else smooth_inv
        out_dtype = node_value(node).dtype if node_value(node) is not None else m.weight.dtype

        sqnr = loss = None
        if stats is not None and stats.rows.shape[0]:
            rows = stats.rows[:SQNR_ROWS]
            b = None if bias is None else bias.detach().to(torch.float32)
            ref = torch.nn.functional.linear(rows, m.weight.detach().to(torch.float32), b)
            out = scheme.reference(rows, consts, b, smooth_inv, x_scale, recipe)
            sqnr = sqnr_db(ref, out)
            if recipe.activation == "static":  # against per-token scales on the same weights
                per_token = SCHEMES[(8, "dynamic")].reference(rows, consts, b, smooth_inv, None, recipe)
                loss = token_sqnr_db(ref, per_token) - token_sqnr_db(ref, out)
        g = gm.graph
        x = activation_of(node)
        fallback, why = _kept_in_float(recipe, sqnr, loss)
        weight_only = None
        if fallback and fallback != "nan" and recipe.activation is not None:
            # the weights alone may still be 8-bit: activations stay in floating point
            weight_only = _weight_only(m, recipe, plan, stats, bias, why)
        if fallback and weight_only is None:
            d = Decision(m.module, "linear", FLOATING_POINT, why, sqnr, weight_bytes_fp32=fp32_bytes,
                         weight_bytes_quantized=fp32_bytes, param_id=id(m.param), static_loss_db=loss,
                         fallback=fallback)
            if smoothed and plan.folded_into:
                # its input arrives divided by s (folded into the shared producer): absorb s in FP
                with g.inserting_before(node):
                    w_s = add_constant(gm, weight.to(m.weight.dtype), "smoothed_weight")
                    new = g.call_function(torch.nn.functional.linear, (x, w_s, m.bias))
                replace_node(gm, node, new)
                node = new
            node.meta[META_KEY] = d
            decisions.append(d)
            continue
        if weight_only is not None:
            consts, sqnr_wo, text = weight_only
            with g.inserting_before(node):
                c = {k: add_constant(gm, v, k) for k, v in consts.items()}
                new = SCHEMES[(8, None)].emit(g, x, c, m.bias, None, None, recipe, out_dtype)
            replace_node(gm, node, new)
            d = Decision(m.module, "linear", WEIGHT_ONLY, text, sqnr_wo, weight_bytes_fp32=fp32_bytes,
                         weight_bytes_quantized=sum(v.numel() * v.element_size() for v in consts.values()),
                         param_id=id(m.param), static_loss_db=loss, fallback=fallback, weight_only=True)
            new.meta[META_KEY] = d
            decisions.append(d)
            continue
        with g.inserting_before(node):
            c = {k: add_constant(gm, v, k) for k, v in consts.items()}
            inv_n = add_constant(gm, in_graph_inv, "smooth_inv") if in_graph_inv is not None else None
            xs_n = add_constant(gm, x_scale, "xscale") if x_scale is not None else None
            new = scheme.emit(g, x, c, m.bias, inv_n, xs_n, recipe, out_dtype)
        replace_node(gm, node, new)

        smoothing = None if not smoothed else (f"folded into {plan.folded_into}" if plan.folded_into
                                               else "applied in the activation quantize op")
        text = scheme.text(recipe) + (", SmoothQuant" if recipe.smoothquant else "") + (f"; {m.reason}" if m.reason else "")
        d = Decision(m.module, "linear", recipe.name, text,
                     sqnr, None if plan is None else plan.alpha,
                     clip if recipe.activation == "static" else None, smoothing, fp32_bytes,
                     sum(v.numel() * v.element_size() for v in consts.values()), id(m.param), loss)
        new.meta[META_KEY] = d
        decisions.append(d)
    g = gm.graph
    # no dead-code elimination: FX would treat in-place call_methods (KV-cache updates) as pure
    g.lint()
    gm.recompile()
    return decisions

