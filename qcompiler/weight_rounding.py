"""Weight rounding at calibration: AWQ / GPTQ weights (and the ``auto`` choice) for every linear.

``qcompiler.calibrate(model, data, recipe=...)`` calls ``prepare`` for recipes whose weights need
an algorithm; it runs the model block by block (``qcompiler.blockwise``), hands each block's
statistics to the recipe's algorithm (``ALGORITHMS``: name -> function over one block's linears)
and stores a ``PreparedWeight`` per linear, which the quantize pass turns into graph constants.
The next block sees the previous blocks as quantized.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch
from torch import nn

from qcompiler import awq, blockwise, gptq, scale_refit
from qcompiler.calibration import PreparedWeight, store_prepared

# the recipe fields a prepared INT4 weight depends on: compiling with other values must not reuse it
KEY_FIELDS = ("weight_bits", "group_size", "symmetric", "algorithm", "awq_grid", "awq_clip",
              "gptq_damp", "gptq_block", "act_order", "first_token_weight",
              "refit_scales")
LAST_RUN: dict = {}  # what the last prepare() did: algorithm, layers, seconds (benchmarks print it)


def weight_key(recipe) -> tuple:
    return tuple(getattr(recipe, f) for f in KEY_FIELDS)


def tied_weights(model: nn.Module) -> set:
    """ids of linear weights that a non-linear module (an input embedding) also holds."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return {id(p) for m in model.modules() if not isinstance(m, nn.Linear)
            for p in m.parameters(recurse=False) if id(p) in linear}


def _refit(r, packed, weight, inputs, s=None):
    """The recipe's scale refit (``qcompiler.scale_refit``) of ``weight`` (``W s``) against the
    Hessian of its input (``x / s``)."""
    if not r.refit_scales:
        return packed
    h = inputs.hessian if s is None else inputs.hessian / s[:, None] / s[None, :]
    return scale_refit.refit(packed, weight, h)


def _weight(li) -> torch.Tensor:
    return li.module.weight.detach().to(torch.float32)


def _gptq_block(linears: list, recipe_of: Callable) -> dict:
    out = {}
    for li in linears:
        r = recipe_of(li)
        w = _weight(li)
        packed = gptq.gptq(w, li.inputs.hessian, r.group_size, r.symmetric, r.gptq_damp, r.gptq_block, r.act_order)
        packed = _refit(r, packed, w, li.inputs)
        out[li.module] = (PreparedWeight(r, weight_key(r), packed), packed.dequantize())
    return out


def _input_groups(linears: list, recipe_of: Callable) -> list:
    """[(recipe, [LinearInput])]: linears reading one tensor under one recipe share AWQ's scales."""
    groups = defaultdict(list)
    for li in linears:
        groups[(li.group, recipe_of(li))].append(li)
    return [(r, members) for (_, r), members in groups.items()]


def _awq_block(linears: list, recipe_of: Callable) -> dict:
    out = {}
    for r, members in _input_groups(linears, recipe_of):
        inputs = members[0].inputs
        weights = [_weight(li) for li in members]
        packed, s, a = awq.awq(weights, inputs.hessian, inputs.mean_abs, r.group_size, r.symmetric,
                               r.awq_grid, r.awq_clip)
        reason = "scales from plain rounding (no exponent beat it)" if a is None else f"AWQ exponent {a:.2f}"
        for li, w, p in zip(members, weights, packed):
            p = _refit(r, p, w * s, inputs, s)
            out[li.module] = (PreparedWeight(r, weight_key(r), p, s, reason), p.dequantize() / s)
    return out


def _awq_gptq_block(linears: list, recipe_of: Callable) -> dict:
    """AWQ's activation-aware scales (and clip ratios), then GPTQ rounding of ``W s`` against the
    Hessian of ``x / s`` on the clipped group grids."""
    out = {}
    for r, members in _input_groups(linears, recipe_of):
        inputs = members[0].inputs
        weights = [_weight(li) for li in members]
        s, a = awq.search_scale(weights, inputs.hessian, inputs.mean_abs, r.group_size, r.symmetric, r.awq_grid)
        h = inputs.hessian / s[:, None] / s[None, :]
        reason = "AWQ scales: none (plain rounding won)" if a is None else f"AWQ exponent {a:.2f}"
        for li, w in zip(members, weights):
            ws = w * s
            ratio = awq.search_clip(ws, h, r.group_size, r.symmetric, r.awq_grid) if r.awq_clip else 1.0
            p = gptq.gptq(ws, h, r.group_size, r.symmetric, r.gptq_damp, r.gptq_block, r.act_order, ratio)
            p = _refit(r, p, ws, inputs, s)
            out[li.module] = (PreparedWeight(r, weight_key(r), p, s, reason + ", GPTQ rounding"), p.dequantize() / s)
    return out


# recipe.algorithm -> (function over one block's linears, whether it needs Hessians)
ALGORITHMS = {"gptq": (_gptq_block, True), "awq": (_awq_block, True), "awq-gptq": (_awq_gptq_block, True)}


def prepare(model: nn.Module, batches: list, recipe, *, loss_fn=None, max_rows: int = 1024,
            progress: bool = True) -> dict:
    """Run the recipe's algorithm over ``batches`` block by block; store and return the weights."""
    if recipe.mixed_precision:
        from qcompiler import auto

        return auto.choose(model, batches, recipe, loss_fn=loss_fn, max_rows=max_rows, progress=progress)
    algorithm, need_hessian = ALGORITHMS[recipe.algorithm]
    need_hessian = need_hessian or recipe.refit_scales
    tied = set() if recipe.quantize_tied else tied_weights(model)
    prepared = {}

    def recipe_of(li):
        r = recipe.for_module(li.name)
        return r if r is not None and r.weight_bits == 4 and r.algorithm == recipe.algorithm else None

    def handle(block_name, linears):
        chosen = [li for li in linears if recipe_of(li) is not None and id(li.module.weight) not in tied]
        result = algorithm(chosen, recipe_of)
        for li in chosen:
            prepared[li.module.weight] = result[li.module][0]
        return {mod: eff for mod, (_, eff) in result.items()}

    start = time.perf_counter()
    ignore = {m for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and (id(m.weight) in tied or recipe.for_module(n) is None)}
    stats = blockwise.run(model, batches, handle, need_hessian=need_hessian, max_rows=max_rows,
                          progress=progress, on_outside=lambda linears: handle("", linears), ignore=ignore,
                          first_token_weight=recipe.first_token_weight)
    store_prepared(prepared, stats)
    LAST_RUN.clear()
    LAST_RUN.update(algorithm=recipe.algorithm, layers=len(prepared), seconds=time.perf_counter() - start)
    return prepared
