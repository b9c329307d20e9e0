"""Weight rounding at calibration: AWQ / GPTQ weights for every linear.

``qcompiler.calibrate(model, data, recipe=...)`` calls ``prepare`` for recipes whose weights need
an algorithm; it runs the model block by block (``qcompiler.calibration.blockwise``), hands each block's
statistics to the recipe's algorithm (``qcompiler.recipe_specs.ALGORITHMS``: AWQ scales or not, and a
rounding from ``ROUNDINGS``)
and stores a ``PreparedWeight`` per linear, which the quantize pass turns into graph constants.
The next block sees the previous blocks as quantized. With ``tune_epochs`` set, the INT4 group
scales are then trained end to end against the float model (``qcompiler.algorithms.scale_tuning``), the one
step that holds the whole model's activations.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from qcompiler.algorithms import awq, clip_search, gptq, scale_refit, scale_tuning
from qcompiler.calibration import blockwise
from qcompiler.calibration.state import is_linear, linear_weight, store_prepared
from qcompiler.calibration.stats import PreparedWeight
from qcompiler.ir import int4
from qcompiler.recipe_specs import ALGORITHMS


def tied_weights(model: nn.Module) -> set:
    """ids of linear weights that a non-linear module (an input embedding) also holds."""
    linear = {id(m.weight) for m in model.modules() if is_linear(m)}
    return {id(p) for m in model.modules() if not is_linear(m)
            for p in m.parameters(recurse=False) if id(p) in linear}


def _weight(li) -> torch.Tensor:
    return linear_weight(li.module).detach().to(torch.float32)


def _rtn(w, h, r, clip) -> int4.PackedInt4:
    return int4.quantize(w, r.group_size, r.symmetric, clip)


def _gptq(w, h, r, clip) -> int4.PackedInt4:
    return gptq.gptq(w, h, r.group_size, r.symmetric, r.gptq_damp, r.gptq_block, r.act_order, clip)


@dataclass(frozen=True)
class Rounding:
    """One way to round a (scaled) weight to INT4: ``(weight, hessian, recipe, clip ratios) ->
    PackedInt4``. The clip search and the scale refit are recipe switches common to all."""

    round: Callable
    label: str


# Algorithm.rounding -> Rounding; every calibrated algorithm needs the Hessians of its linears' inputs
ROUNDINGS = {
    "nearest": Rounding(_rtn, "round to nearest"),
    "gptq": Rounding(_gptq, "GPTQ rounding"),
}


def round_weights(weights: list, hessian: torch.Tensor, mean_abs: torch.Tensor, recipe, scaled: bool = True) -> tuple:
    """``([PackedInt4], s or None, reason)`` for linears that read one input (Gram matrix
    ``hessian`` [K, K], mean magnitude ``mean_abs`` [K]) under ``recipe``'s algorithm: AWQ scales
    ``s`` (the packed weights are of ``W s``; the input must be divided by ``s``; none when
    ``scaled`` is False: a member in ``recipe.smooth_skip``), clip search, rounding, scale refit."""
    rounding = ROUNDINGS[ALGORITHMS[recipe.algorithm].rounding]
    h, s, reasons = hessian.to(torch.float32), None, []
    if recipe.awq_scales and not scaled:
        reasons.append("AWQ scales: none (smooth_skip)")
    elif recipe.awq_scales:
        s, a = awq.search_scale(weights, h, mean_abs, recipe.group_size, recipe.symmetric, recipe.awq_grid)
        reasons.append("AWQ scales: none (plain rounding won)" if a is None else f"AWQ exponent {a:.2f}")
        h = h / s[:, None] / s[None, :]
    reasons.append(rounding.label)
    packed = []
    for w in weights:
        ws = w if s is None else w * s
        clip = clip_search.search(ws, h, recipe.group_size, recipe.symmetric, recipe.weight_clip_grid) \
            if recipe.weight_clip else 1.0
        p = rounding.round(ws, h, recipe, clip)
        packed.append(scale_refit.refit(p, ws, h) if recipe.refit_scales else p)
    return packed, s, ", ".join(reasons)


def _input_groups(linears: list, recipe_of: Callable) -> list:
    """[(recipe, [LinearInput])]: linears reading one tensor under one recipe share AWQ's scales."""
    groups = defaultdict(list)
    for li in linears:
        groups[(li.group, recipe_of(li))].append(li)
    return [(r, members) for (_, r), members in groups.items()]


def round_block(linears: list, recipe_of: Callable) -> dict:
    """``{module: (PreparedWeight, effective float weight)}`` for one block's linears."""
    out = {}
    for r, members in _input_groups(linears, recipe_of):
        inputs = members[0].inputs
        weights = [_weight(li) for li in members]
        scaled = not any(r.smooth_skipped(li.name) for li in members)
        packed, s, reason = round_weights(weights, inputs.hessian, inputs.mean_abs, r, scaled)
        for li, p in zip(members, packed):
            out[li.module] = (PreparedWeight(r, r.prepared_key, p, s, reason),
                              p.dequantize() if s is None else p.dequantize() / s)
    return out


def prepare(model: nn.Module, batches: list, recipe, *, loss_fn=None, max_rows: int = 1024,
            progress: bool = True) -> dict:
    """Run the recipe's algorithm over ``batches`` block by block; store and return the weights."""
    tied = set() if recipe.quantize_tied else tied_weights(model)
    prepared = {}

    def recipe_of(li):
        r = recipe.for_module(li.name)
        return r if r is not None and r.weight_bits == 4 and r.algorithm == recipe.algorithm else None

    def handle(block_name, linears):
        chosen = [li for li in linears if recipe_of(li) is not None and id(li.module.weight) not in tied]
        result = round_block(chosen, recipe_of)
        for li in chosen:
            prepared[li.module.weight] = result[li.module][0]
        return {mod: eff for mod, (_, eff) in result.items()}

    start = time.perf_counter()
    ignore = {m for n, m in model.named_modules() if is_linear(m)
              and (id(m.weight) in tied or recipe.for_module(n) is None)}
    stats = blockwise.run(model, batches, handle, need_hessian=True, max_rows=max_rows,
                          progress=progress, on_outside=lambda linears: handle("", linears), ignore=ignore,
                          first_token_weight=recipe.first_token_weight)
    rounded = time.perf_counter()
    tuning = None
    if recipe.tune_epochs:
        prepared, tuning = scale_tuning.tune(model, batches, prepared, recipe.tune_epochs, recipe.tune_lr,
                                             progress=progress)
    # what this run did (the model's state keeps it as ``last_run``; benchmarks print it):
    # tuning_loss is the first and last epoch's mean calibration loss, None without tuning
    store_prepared(model, prepared, stats, last_run=dict(
        algorithm=recipe.algorithm, layers=len(prepared), seconds=time.perf_counter() - start,
        rounding_seconds=rounded - start, tuning_loss=tuning))
    return prepared
