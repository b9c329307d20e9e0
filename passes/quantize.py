"""Quantize: replace each chosen linear by its scheme's q-ops, weights quantized once, here.

Each matched linear goes through three steps:
  * measure: its scheme's reference output against FP32 on the calibration rows (output SQNR,
    and for static activation scales the per-token SQNR they lose against per-token scales);
  * decide: the recipe's guards keep the scheme, fall back to 8-bit weights with floating-point
    activations, or keep the layer in floating point (``_kept_in_float``);
  * emit: the scheme's q-op nodes replace the linear, with one ``Decision`` saying what and why.
The schemes (``qcompiler.schemes``, found by the recipe's ``scheme_key``) say how each kind of
linear quantizes its weight, computes (the reference q-ops) and appears in the graph. INT4 codes
come from round-to-nearest here or from AWQ / GPTQ at calibration (``qcompiler.algorithms.rounding``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qcompiler.calibration.observers import static_scale
from qcompiler.calibration.state import stats_for
from qcompiler.errors import CalibrationError
from qcompiler.passes.graph_utils import add_constant, replace_node
from qcompiler.passes.match import activation_of
from qcompiler.passes.meta import FLOATING_POINT, META_KEY, Decision, node_value
from qcompiler.passes.prepared import checked_prepared
from qcompiler.passes.sqnr import SQNR_ROWS, ErrorSums
from qcompiler.schemes.registry import SCHEMES, SchemeKey

WEIGHT_ONLY = "w8a16"  # what a layer whose activations failed a guard runs as, when its weights pass
WEIGHT_ONLY_KEY = SchemeKey("int8")  # INT8: every target's weight-only kernel


@dataclass
class Layer:
    """One matched linear as the three steps see it."""

    node: fx.Node
    match: object                      # its LinearMatch
    recipe: object
    plan: object                       # its ActivationPlan, or None
    weight: Tensor                     # float32 [N, K], times the smoothing scale s when smoothed
    smooth_inv: Optional[Tensor]       # 1/s on raw activations, or None
    clip: float
    stats: object                      # its calibration statistics, or None
    bias: Optional[Tensor]             # float32, for measuring

    @property
    def smoothed(self) -> bool:
        return self.plan is not None and self.plan.scale is not None

    @property
    def folded(self) -> bool:
        """1/s was folded into the producer: the input arrives divided by s."""
        return self.smoothed and bool(self.plan.folded_into)

    def rows(self) -> Optional[Tensor]:
        return None if self.stats is None or not self.stats.rows.shape[0] else self.stats.rows[:SQNR_ROWS]

    def float_output(self, rows: Tensor, part: slice = slice(None)) -> Tensor:
        """The float linear on ``rows``, its output channels ``part`` only."""
        bias = None if self.bias is None else self.bias[part]
        return F.linear(rows, self.match.weight.detach()[part].to(torch.float32), bias)


@dataclass(frozen=True)
class Outcome:
    """What decide chose: the scheme to emit (None: floating point), its weight, and the record's fields."""

    scheme: object
    weight: object
    name: str                # the Decision's scheme: the recipe's name, WEIGHT_ONLY or FLOATING_POINT
    reason: str
    sqnr: Optional[float]
    fallback: Optional[str] = None


def checked_static_scale(stats, smooth_inv: Optional[Tensor], recipe, module: str, clip: float) -> Tensor:
    if stats is None:
        raise CalibrationError(
            f"recipe {recipe.name!r} quantizes activations with static scales, but {module!r} has no "
            f"calibration statistics: run `with qcompiler.calibrate(model): model(batch)` on "
            f"representative data before the first call, or use the dynamic recipe 'w8a8'")
    return static_scale(stats, smooth_inv, recipe, clip)


def _layer(node, m, bias, plan) -> Layer:
    weight = m.weight.detach().to(torch.float32)
    smoothed = plan is not None and plan.scale is not None
    stats = stats_for(m.param)
    return Layer(node=node, match=m, recipe=m.recipe, plan=plan, weight=weight * plan.scale if smoothed else weight,
                 smooth_inv=1.0 / plan.scale if smoothed else None,
                 clip=plan.clip if plan is not None else float(m.recipe.clip),
                 stats=None if stats is None else stats.to(weight.device),  # math beside the weights
                 bias=None if bias is None else bias.detach().to(torch.float32))


MEASURE_BLOCK = 1 << 22  # weight elements measured at a time (``_error_sums``)


def _error_sums(layer: Layer, scheme, qweight, x: Tensor, x_scale, smooth_inv, against=None) -> tuple:
    """(``ErrorSums`` of ``scheme`` on input ``x`` against the float linear on the calibration rows,
    the same for the scheme ``against`` or None), a block of output channels at a time
    (``MEASURE_BLOCK`` weight elements): a scheme's reference dequantizes the weight it is given,
    and a wide layer whole (a tied ``lm_head``: 49152 x 576) would hold a float copy of it beside
    two outputs of its width."""
    rows, n = layer.rows(), layer.match.weight.shape[0]
    sums, other = ErrorSums(), (ErrorSums() if against is not None else None)
    step = max(1, MEASURE_BLOCK // max(1, layer.match.weight[0].numel()))
    for lo in range(0, n, step):
        part = slice(lo, min(n, lo + step))
        block = qweight.map(lambda _, t: t[part] if t.dim() and t.shape[0] == n else t)  # per-output-row fields
        ref = layer.float_output(rows, part)
        kw = dict(bias=None if layer.bias is None else layer.bias[part], smooth_inv=smooth_inv, recipe=layer.recipe)
        sums.add(ref, scheme.reference(x, block, x_scale=x_scale, **kw))
        if other is not None:
            other.add(ref, against.reference(x, block, x_scale=None, **kw))
    return sums, other


def _measure(layer: Layer, scheme, qweight, x_scale) -> tuple:
    """(output SQNR, static scale's loss in dB) on the calibration rows; (None, None) without them."""
    rows = layer.rows()
    if rows is None:
        return None, None
    # a static scale's loss: against per-token scales on the same weights
    per_token = SCHEMES.get(dataclasses.replace(scheme.key, scale="dynamic")) if scheme.key.scale == "static" else None
    out, token = _error_sums(layer, scheme, qweight, rows, x_scale, layer.smooth_inv, per_token)
    return out.sqnr_db(), (None if token is None else token.token_sqnr_db() - out.token_sqnr_db())


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


def _weight_only(layer: Layer, why: str, fallback: str) -> Optional[Outcome]:
    """The linear with INT8 weights and floating-point activations, when activation quantization
    failed a guard; None when that too misses ``min_sqnr_db``.

    A smoothing scale folded into the producer stays (the input arrives divided by s, the weight
    is W * s); one that would be applied in the activation quantize step is dropped (raw W)."""
    scheme = SCHEMES.get(WEIGHT_ONLY_KEY)
    raw = layer.match.weight.detach().to(torch.float32)
    qweight = scheme.quantize_weight(layer.weight if layer.folded else raw, layer.recipe, None)
    rows = layer.rows()
    x = rows / layer.plan.scale if layer.folded else rows
    sqnr = _error_sums(layer, scheme, qweight, x, None, None)[0].sqnr_db()
    floor = layer.recipe.min_sqnr_db
    if math.isnan(sqnr) or (floor is not None and sqnr < floor):
        return None
    text = "INT8 weights per channel, activations in floating point (weights only): " + why.split(": ", 1)[-1]
    return Outcome(scheme, qweight, WEIGHT_ONLY, text, sqnr, fallback)


def _decide(layer: Layer, scheme, qweight, sqnr, loss, trained: Optional[str] = None) -> Outcome:
    """Keep the scheme, or fall back (8-bit weights only, else floating point) as the guards say.
    A trained layer (``trained``: how) keeps its scheme unless its output is NaN: training measured
    the whole model with it quantized, which the guards' per-layer SQNR only estimates."""
    recipe, m = layer.recipe, layer.match
    fallback, why = _kept_in_float(recipe, sqnr, loss)
    if trained is not None and fallback != "nan":
        fallback, why = None, ""
    if not fallback:
        text = scheme.describe(recipe) + (", SmoothQuant" if recipe.smoothquant else "") + \
            (f"; {trained}" if trained else "") + (f"; {m.reason}" if m.reason else "")
        return Outcome(scheme, qweight, recipe.name, text, sqnr)
    if fallback != "nan" and recipe.activation is not None:  # the weights alone may still be 8-bit
        weight_only = _weight_only(layer, why, fallback)
        if weight_only is not None:
            return weight_only
    return Outcome(None, None, FLOATING_POINT, why, sqnr, fallback)


def _emit(gm: fx.GraphModule, layer: Layer, outcome: Outcome, x_scale) -> fx.Node:
    """The node that replaces the linear: the outcome's scheme, or the float linear (on W * s when
    its input arrives divided by s), or the node itself when nothing changes."""
    g, node, m = gm.graph, layer.node, layer.match
    x = activation_of(node)
    if outcome.scheme is None and not layer.folded:
        return node
    with g.inserting_before(node):
        if outcome.scheme is None:  # its input arrives divided by s (folded into the shared producer): absorb s
            w_s = add_constant(gm, layer.weight.to(m.weight.dtype), "smoothed_weight")
            new = g.call_function(F.linear, (x, w_s, m.bias))
        else:
            weight = outcome.weight.map(lambda name, t: add_constant(gm, t, name))
            weight_only = outcome.name == WEIGHT_ONLY
            inv = None if weight_only or layer.smooth_inv is None or layer.folded else \
                add_constant(gm, layer.smooth_inv, "smooth_inv")
            xs = None if weight_only or x_scale is None else add_constant(gm, x_scale, "xscale")
            out_dtype = node_value(node).dtype if node_value(node) is not None else m.weight.dtype
            new = outcome.scheme.emit(g, x, weight, bias=m.bias, smooth_inv=inv, x_scale=xs, recipe=layer.recipe,
                                      out_dtype=out_dtype)
    replace_node(gm, node, new)
    return new


def _record(layer: Layer, outcome: Outcome, loss) -> Decision:
    m, recipe, plan = layer.match, layer.recipe, layer.plan
    fp32_bytes = m.weight.numel() * 4
    common = dict(module=m.module, op="linear", weight_bytes_fp32=fp32_bytes, param_id=id(m.param),
                  static_loss_db=loss, fallback=outcome.fallback, scheme=outcome.name, reason=outcome.reason,
                  sqnr_db=outcome.sqnr)
    if outcome.scheme is None:
        return Decision(**common, weight_bytes_quantized=fp32_bytes)
    if outcome.name == WEIGHT_ONLY:
        return Decision(**common, weight_bytes_quantized=outcome.weight.nbytes, weight_only=True)
    smoothing = None if not layer.smoothed else (f"folded into {plan.folded_into}" if plan.folded_into
                                                 else "applied in the activation quantize op")
    return Decision(**common, weight_bytes_quantized=outcome.weight.nbytes,
                    alpha=None if plan is None else plan.alpha,
                    clip=layer.clip if recipe.activation == "static" else None, smoothing=smoothing)


def quantize(gm: fx.GraphModule, matches: list, plans: dict, replaced=None) -> list:
    """Rewrite matched linears into q-ops; return one ``Decision`` per matched linear.
    ``replaced(param)`` is called for each weight Parameter as soon as the graph reads its
    quantized copy instead (the backend lets a mapped weight's pages go before the next is read)."""
    decisions = []
    for node, m, bias in matches:
        if m.recipe is None:
            fp32_bytes = m.weight.numel() * 4
            d = Decision(module=m.module, op="linear", scheme=FLOATING_POINT, reason=m.reason,
                         weight_bytes_fp32=fp32_bytes, weight_bytes_quantized=fp32_bytes, param_id=id(m.param))
        else:
            layer = _layer(node, m, bias, plans.get(node))
            scheme = SCHEMES.get(layer.recipe.scheme_key)
            prepared = checked_prepared(m, layer.recipe)
            trained = prepared is not None and prepared.trained
            qweight = scheme.quantize_weight(layer.weight, layer.recipe, prepared)
            x_scale = None if scheme.key.scale != "static" else prepared.x_scale if trained else \
                checked_static_scale(layer.stats, layer.smooth_inv, layer.recipe, m.module, layer.clip)
            sqnr, loss = _measure(layer, scheme, qweight, x_scale)
            outcome = _decide(layer, scheme, qweight, sqnr, loss, prepared.reason if trained else None)
            node = _emit(gm, layer, outcome, x_scale)
            d = _record(layer, outcome, loss)
            if replaced is not None and d.scheme != FLOATING_POINT:
                replaced(m.param)
        node.meta[META_KEY] = d
        decisions.append(d)
    # no dead-code elimination: FX would treat in-place call_methods (KV-cache updates) as pure
    gm.graph.lint()
    gm.recompile()
    return decisions
