"""``qcompiler.qat.prepare``: put fake quantization into every linear a recipe would quantize.

The layers chosen are the compiled model's: the recipe's ``skip`` and per-module ``overrides``
apply, a weight tied to the input embedding stays in floating point unless ``quantize_tied``, a
weight that is not a float type stays. Each chosen layer becomes a ``QATLinear`` whose scales
start where post-training quantization would put them:

* INT4 with AWQ / GPTQ (``qcompiler.calibrate(model, batches, recipe=...)`` run first): the
  calibrated codes, scales and AWQ input scales; the trained weight starts at those codes;
* INT4 round to nearest and 8-bit weights: the round-to-nearest scales of the model's weights;
* static activations: the scale the recipe's observer takes from the calibration statistics
  (``with qcompiler.calibrate(model): model(batch)`` first).

Every other parameter is frozen (``requires_grad`` restored by ``convert``): what trains is the
quantized linears' weights (``train_weights``) and their scales. The float weight of a layer whose
weight trains or starts at calibrated codes is kept beside it (``QATLinear.teacher_weight``, a
non-persistent buffer), so the model with its fake quantization switched off is exactly the
floating-point model it started as: the teacher ``distill`` uses. Training scales alone from
round-to-nearest keeps no copy at all.
The run's record (``QATRun``) is an object the model owns, so ``convert`` can check that the
model it gets is the one prepared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Union

import torch
from torch import nn

from qcompiler.algorithms.rounding import tied_weights
from qcompiler.calibration.observers import static_scale
from qcompiler.calibration.state import (checked_prepared_weight, is_conv1d, linear_layers, linear_weight, state_of,
                                        stored_weight, unwrap)
from qcompiler.errors import CalibrationError, OptionError
from qcompiler.qat.linear import QATLinear
from qcompiler.recipes import Recipe, get_recipe, resolve
from qcompiler.schemes.registry import SCHEMES

RUN = "_qcompile_qat"
FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class QATRun:
    """What ``prepare`` did to a model: the recipe, each fake-quantized layer's weight shape, the
    ``requires_grad`` of every parameter before, and which layers share one AWQ input scale."""

    recipe: Recipe
    layers: dict                                           # name -> weight shape
    requires_grad: dict                                    # parameter name -> its flag before prepare
    smooth_groups: dict = field(default_factory=dict)      # name -> id of the layers sharing its AWQ scale
    kept: dict = field(default_factory=dict)               # name -> why it stays in floating point
    steps: int = 0                                         # optimizer steps distill and blockwise ran


def trainable(recipe: Recipe) -> str:
    """Why ``recipe`` cannot be trained ("" when it can)."""
    if recipe.mixed_precision:
        return ("'auto' chooses each layer's format on calibration data; train a fixed recipe (w4a16, w8a8, fp8, "
                "...) and use overrides for per-module formats")
    if recipe.attention is not None:
        return (f"attention={recipe.attention!r}: quantized attention is not trained; prepare with attention=None "
                f"and compile with it, or compile without it")
    if recipe.smoothquant:
        return ("SmoothQuant's scales are chosen at compile time from calibration statistics, and training moves "
                "the weights they were chosen for; train 'w8a8' (per token) or 'w8a8-static' instead, whose "
                "scales training learns")
    return ""


def _recipe(recipe) -> Recipe:
    return resolve(recipe) if isinstance(recipe, Mapping) else get_recipe(recipe)


def _start(state, name: str, weight: torch.Tensor, r: Recipe, scheme):
    """(quantized weight training starts from, AWQ scale s or None, the PreparedWeight it came from or None)."""
    prepared = checked_prepared_weight(state.prepared.get(name), name, r, "qcompiler.qat.prepare")
    s = None if prepared is None else prepared.smooth_scale
    return scheme.quantize_weight(weight if s is None else weight * s, r, prepared), s, prepared


def prepare(model: nn.Module, recipe: Union[str, Recipe, Mapping] = "w4a16", *, train_weights: bool = True) -> nn.Module:
    """Make ``model`` train with the quantization ``recipe`` will compile it with (in place; returned).

    Args:
        model: any module with linear layers (or ``torch.compile`` of one).
        recipe: a recipe name, ``Recipe`` or options dict, as ``torch.compile(..., options=...)`` takes.
        train_weights: train the quantized linears' weights with their scales (True), or the
            scales alone (False: LSQ / EfficientQAT's end-to-end stage, and no teacher copy).

    Then train (``qcompiler.qat.distill``, the transformers ``Trainer``, any loop; DDP and FSDP2
    wrap it as any model), and ``qcompiler.qat.convert(model)`` before compiling or exporting.
    """
    model = unwrap(model)
    if model.__dict__.get(RUN) is not None:
        raise OptionError("this model is prepared for quantization-aware training already: train it, then "
                          "qcompiler.qat.convert(model) (prepare once per run)")
    recipe = _recipe(recipe)
    why = trainable(recipe)
    if why:
        raise OptionError(f"recipe {recipe.name!r} cannot be trained: {why}")
    if recipe.weight_bits is None and not recipe.overrides:
        raise OptionError(f"recipe {recipe.name!r} keeps weights in floating point: nothing to train")
    state = state_of(model)
    tied = set() if recipe.quantize_tied else tied_weights(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    layers, kept, groups, swaps = {}, {}, {}, []
    for name, mod in list(linear_layers(model)):
        r = recipe.for_module(name)
        if r is not None and trainable(r):
            raise OptionError(f"{name!r} takes recipe {r.name!r} (an override), which cannot be trained: {trainable(r)}")
        if r is None or r.weight_bits is None:
            kept[name] = "kept in floating point by the recipe (skip / override)"
            continue
        if id(mod.weight) in tied:
            kept[name] = "weight tied to the input embedding (quantize_tied=False)"
            continue
        if mod.weight.dtype not in FLOAT_TYPES:
            kept[name] = f"weight dtype {mod.weight.dtype} is not a float type"
            continue
        scheme = SCHEMES.get(r.scheme_key)
        weight = linear_weight(mod).detach().to(torch.float32)
        qweight, s, prepared = _start(state, name, weight, r, scheme)
        scale, zero = scheme.learned_scales(qweight)
        x_scale = None
        if scheme.key.scale == "static":
            stats = state.stats.get(name)
            if stats is None:
                raise CalibrationError(f"recipe {r.name!r} learns static activation scales starting from "
                                       f"calibration, and {name!r} has no statistics: run `with "
                                       f"qcompiler.calibrate(model): model(batch)` before qcompiler.qat.prepare")
            x_scale = static_scale(stats.to(weight.device), None, r, r.clip if r.clip != "auto" else 1.0)
        # the teacher's float weight, kept apart when the trained weight moves: it trains, or it
        # starts at calibrated codes
        teacher = mod.weight.detach().clone() if train_weights or prepared is not None else None
        if prepared is not None:
            start = scheme.dequantized(qweight, r, weight.shape[1])
            with torch.no_grad():
                mod.weight.copy_(stored_weight(mod, start if s is None else start / s).to(mod.weight.dtype))
        if s is not None:
            groups[name] = id(s)
        swaps.append((name, QATLinear(mod, name, scheme, r, transposed=is_conv1d(mod), scale=scale, zero=zero,
                                      smooth_scale=s, input_scale=x_scale, teacher_weight=teacher)))
        layers[name] = tuple(mod.weight.shape)
    if not swaps:
        raise OptionError(f"recipe {recipe.name!r} quantizes none of this model's linear layers "
                          f"({len(kept)} kept in floating point: {sorted(set(kept.values()))})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, q in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        q.weight.requires_grad_(train_weights)
        q.weight_scale.requires_grad_(True)
        if q.input_scale is not None:
            q.input_scale.requires_grad_(True)
    object.__setattr__(model, RUN, QATRun(recipe, layers, before, groups, kept))
    return model


def run_of(model: nn.Module) -> QATRun:
    """The record ``prepare`` left on ``model`` (DDP / FSDP / compile wrappers looked through)."""
    model = unwrap(getattr(model, "module", model))
    run = model.__dict__.get(RUN)
    if run is None:
        raise OptionError("this model was not prepared for quantization-aware training: call "
                          "qcompiler.qat.prepare(model, recipe=...) first")
    return run


def qat_layers(model: nn.Module) -> dict:
    """name -> ``QATLinear`` of a prepared model (names relative to it)."""
    return {n: m for n, m in unwrap(getattr(model, "module", model)).named_modules() if isinstance(m, QATLinear)}
