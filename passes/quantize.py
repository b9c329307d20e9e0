"""Quantize: replace each chosen linear by q-ops, weights quantized and packed once, here.

Per recipe activation scheme the linear ``y = x W^T + b`` becomes
  * weight-only: ``linear_w8a16(x, Wq, sw, b)``
  * dynamic:     ``xq, sx = quantize_per_token(x, 1/s)``; ``linear_w8a8(xq, sx, Wq, sw, b)``
  * static:      ``xq = quantize_per_tensor(x, sx, 1/s)``; ``linear_w8a8(xq, sx, Wq, sw, b)``
with ``Wq, sw = quantize_per_channel(W * s)`` (``s = 1`` without SmoothQuant; ``1/s`` omitted
when the smooth pass folded it into the producer). Every rewritten node gets a ``Decision``
with the layer's output SQNR against FP32 on the calibration rows, computed by the reference
q-ops themselves.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
from torch import Tensor, fx

from qcompiler import ops
from qcompiler.calibration import CalibrationError, stats_for
from qcompiler.observers import static_scale
from qcompiler.passes.graph_utils import add_constant
from qcompiler.passes.match import activation_of
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision

qops = torch.ops.qcompile
SQNR_ROWS = 256  # enough rows for a stable dB figure, few enough to keep compile time short


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); +inf when exact, NaN never passes silently."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return float("nan")
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def checked_static_scale(stats, smooth_inv: Optional[Tensor], recipe, module: str, clip: float) -> Tensor:
    if stats is None:
        raise CalibrationError(
            f"recipe {recipe.name!r} quantizes activations with static scales, but {module!r} has no "
            f"calibration statistics: run `with qcompiler.calibrate(model): model(batch)` on "
            f"representative data before the first call, or use the dynamic recipe 'w8a8'")
    return static_scale(stats, smooth_inv, recipe, clip)


def _reference_output(x: Tensor, recipe, wq, ws, bias, smooth_inv, x_scale) -> Tensor:
    """The quantized layer on float rows, through the reference q-ops (for the SQNR)."""
    if recipe.activation is None:
        return ops.linear_w8a16_ref(x, wq, ws, bias)
    if recipe.activation == "dynamic":
        xq, sx = ops.quantize_per_token_ref(x, smooth_inv)
    else:
        xq, sx = ops.quantize_per_tensor_ref(x, x_scale, smooth_inv), x_scale
    return ops.linear_w8a8_ref(xq, sx, wq, ws, bias, torch.float32)


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
        weight = m.weight.detach().to(torch.float32)
        smoothed = plan is not None and plan.scale is not None
        smooth_inv = 1.0 / plan.scale if smoothed else None               # on raw activations
        clip = plan.clip if plan is not None else float(recipe.clip)
        if smoothed:
            weight = weight * plan.scale
        wq, ws = ops.quantize_per_channel_ref(weight)
        stats = stats_for(m.param)
        stats = None if stats is None else stats.to(weight.device)  # math beside the weights
        x_scale = checked_static_scale(stats, smooth_inv, recipe, m.module, clip) if recipe.activation == "static" else None
        in_graph_inv = None if not smoothed or plan.folded_into else smooth_inv
        out_dtype = node.meta["example_value"].dtype if "example_value" in node.meta else m.weight.dtype

        sqnr = None
        if stats is not None and stats.rows.shape[0]:
            rows = stats.rows[:SQNR_ROWS]
            b = None if bias is None else bias.detach().to(torch.float32)
            ref = torch.nn.functional.linear(rows, m.weight.detach().to(torch.float32), b)
            sqnr = sqnr_db(ref, _reference_output(rows, recipe, wq, ws, b, smooth_inv, x_scale))
        floor = recipe.min_sqnr_db
        g = gm.graph
        x = activation_of(node)
        if sqnr is not None and floor is not None and sqnr < floor:
            d = Decision(m.module, "linear", FLOATING_POINT,
                         f"{recipe.name}: output SQNR {sqnr:.1f} dB on the calibration data is below "
                         f"min_sqnr_db={floor:g}", sqnr, weight_bytes_fp32=fp32_bytes,
                         weight_bytes_quantized=fp32_bytes, param_id=id(m.param))
            if smoothed and plan.folded_into:
                # its input arrives divided by s (folded into the shared producer): absorb s in FP
                with g.inserting_before(node):
                    w_s = add_constant(gm, weight.to(m.weight.dtype), "smoothed_weight")
                    new = g.call_function(torch.nn.functional.linear, (x, w_s, m.bias))
                node.replace_all_uses_with(new)
                g.erase_node(node)
                node = new
            node.meta[META_KEY] = d
            decisions.append(d)
            continue
        with g.inserting_before(node):
            wq_n, ws_n = add_constant(gm, wq, "wq"), add_constant(gm, ws, "wscale")
            inv_n = add_constant(gm, in_graph_inv, "smooth_inv") if in_graph_inv is not None else None
            if recipe.activation is None:
                new = g.call_function(qops.linear_w8a16.default, (x, wq_n, ws_n, m.bias))
            else:
                if recipe.activation == "dynamic":
                    q = g.call_function(qops.quantize_per_token.default, (x, inv_n))
                    xq, sx = g.call_function(operator.getitem, (q, 0)), g.call_function(operator.getitem, (q, 1))
                else:
                    sx = add_constant(gm, x_scale, "xscale")
                    xq = g.call_function(qops.quantize_per_tensor.default, (x, sx, inv_n))
                new = g.call_function(qops.linear_w8a8.default, (xq, sx, wq_n, ws_n, m.bias, out_dtype))
        node.replace_all_uses_with(new)
        g.erase_node(node)

        smoothing = None if not smoothed else (f"folded into {plan.folded_into}" if plan.folded_into
                                               else "applied in the activation quantize op")
        d = Decision(m.module, "linear", recipe.name, _scheme_text(recipe), sqnr,
                     None if plan is None else plan.alpha,
                     clip if recipe.activation == "static" else None, smoothing, fp32_bytes,
                     wq.numel() * wq.element_size() + ws.numel() * ws.element_size(), id(m.param))
        new.meta[META_KEY] = d
        decisions.append(d)
    g = gm.graph
    # no dead-code elimination: FX would treat in-place call_methods (KV-cache updates) as pure
    g.lint()
    gm.recompile()
    return decisions


def _scheme_text(recipe) -> str:
    act = {None: "weights only", "dynamic": "activations INT8 per token",
           "static": f"activations INT8 per tensor ({recipe.observer})"}[recipe.activation]
    return f"INT8 weights per channel, {act}" + (", SmoothQuant" if recipe.smoothquant else "")
