"""The compressed-tensors checkpoint: a quantized model as llm-compressor writes it, for vLLM, SGLang
and transformers.

``export_checkpoint(model, out_dir, recipe=...)`` writes a Hugging Face model folder (config with
its ``quantization_config``, compressed safetensors, the tokenizer when given) through the
``compressed-tensors`` library itself: its ``apply_quantization_config`` attaches the scheme to
each linear, qcompile fills in the weights and scales it computed (the same per-channel INT8 /
FP8 rounding as the quantize pass; INT4 codes and group scales as GPTQ, tuning or round-to-nearest
left them), and its ``ModelCompressor`` packs and saves them. Nothing is packed by hand here.

What maps onto the format, per recipe:

* ``w8a8`` / ``fp8``: 8-bit weights per output channel, activations dynamic per token;
* ``w8a16``: INT8 weights per output channel, activations in floating point;
* INT4 weight-only (``w4a16``, ``w4a16-gptq``, ...; symmetric or not, any group size): packed
  4-bit codes with a scale (and zero point) per group, exactly the codes qcompile computed.

SmoothQuant and AWQ input scales ``s`` have no field in the format: the weights are written as
``W s`` and ``1/s`` is folded into the norm that produces the input, as llm-compressor does. The
scales and the norms they fold into are the smooth pass's own decisions, read from a capture of
the model (``torch.export`` on a few tokens), so the folder computes what the compiled model
computes. Where the compiled model divides inside its activation quantizer because no norm feeds
the linear, a gated MLP's ``down_proj`` (input ``act(gate) * up``) has its ``1/s`` folded into
``up_proj``'s rows instead (its codes unchanged, its row scales divided). Any other such linear
(attention's output into ``o_proj``; a fused ``gate_up_proj``) cannot carry a scale: the error
names them and the recipe field that leaves them unscaled (``smooth_skip``), to use for
calibration, compilation and export alike.

What does not map (an ``OptionError`` naming why and what to use): static activation scales,
``auto``'s mixed formats, INT8 embeddings. The accuracy guards are compile-time decisions and are
not applied: every linear the recipe covers is written quantized.
"""
from __future__ import annotations

import copy
import os
import pathlib
from typing import Optional, Union

import torch
from torch import nn

from qcompiler.calibration.state import checked_prepared_weight, linear_layers, prepared_for, unwrap
from qcompiler.deploy.modes import evaluating
from qcompiler.errors import MissingDependency, OptionError
from qcompiler.ir import int4, ops
from qcompiler.passes.match import match
from qcompiler.passes.smooth import folded_parameter, producing_linear, smooth
from qcompiler.recipes import Recipe, get_recipe, resolve

INSTALL = "pip install compressed-tensors"


def _ct():
    try:
        import compressed_tensors  # noqa: F401
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                     QuantizationStatus, apply_quantization_config)
    except ImportError as e:
        raise MissingDependency(f"writing a compressed-tensors checkpoint needs the compressed-tensors library "
                                f"({e.name or e}): {INSTALL}") from None
    return dict(ModelCompressor=ModelCompressor, QuantizationArgs=QuantizationArgs,
                QuantizationConfig=QuantizationConfig, QuantizationScheme=QuantizationScheme,
                QuantizationStatus=QuantizationStatus, apply_quantization_config=apply_quantization_config)


def _why_not(recipe: Recipe) -> Optional[str]:
    """Why ``recipe`` has no compressed-tensors form here (None when it has one)."""
    if recipe.mixed_precision:
        return "'auto' assigns a format per layer; export the recipe it chose most, or w4a16-gptq"
    if recipe.weight_bits is None:
        return "the recipe quantizes no weights"
    if recipe.activation == "static":
        return "static activation scales are not written by this exporter yet; use 'w8a8' (dynamic per token)"
    if recipe.activation == "blocks":
        return ("activation scales per block of channels are not written by this exporter (vLLM runs per-token "
                "ones); use 'w8a8', or export ONNX")
    if recipe.embedding is not None:
        return "INT8 embedding tables have no compressed-tensors form; leave embedding=None"
    return None


def _scheme(ct, recipe: Recipe, targets: list):
    args = ct["QuantizationArgs"]
    kind = "float" if recipe.number_format == "fp8" else "int"
    if recipe.weight_bits == 4:
        weights = args(num_bits=4, type="int", symmetric=recipe.symmetric, strategy="group",
                       group_size=recipe.group_size)
    else:
        weights = args(num_bits=8, type=kind, symmetric=True, strategy="channel")
    inputs = None
    if recipe.activation == "dynamic":
        inputs = args(num_bits=8, type=kind, symmetric=True, strategy="token", dynamic=True)
    return ct["QuantizationScheme"](targets=targets, weights=weights, input_activations=inputs)


def _input_scales(source: nn.Module, recipe: Recipe) -> tuple:
    """``({linear: s}, {parameter: s}, {linear: s})``: the smooth pass's input scale of each smoothed
    linear, the producer parameters that absorb ``1/s`` (a norm's), and the linears whose output
    rows absorb it instead (``up_proj`` for ``down_proj``), from a capture of ``source`` on a few
    tokens."""
    ids = torch.zeros(1, 8, dtype=torch.long)
    try:
        with evaluating(source), torch.no_grad():
            program = torch.export.export(source, (), {"input_ids": ids, "use_cache": False})
    except Exception as e:
        raise OptionError(f"the SmoothQuant / AWQ scales of recipe {recipe.name!r} are read from a capture of the "
                          f"model by torch.export, which failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"a recipe without input scales ('w8a8', 'w4a16-gptq') needs no capture") from e
    gm = program.module()
    matches = match(gm, [ids], recipe)
    plans = smooth(gm, [ids], matches)
    linears, folds, rows, unfoldable = {}, {}, {}, []
    nodes = {node: m for node, m, _ in matches}
    for node, m, _ in matches:
        plan = plans.get(node)
        if m.recipe is None or plan is None or plan.scale is None or bool((plan.scale == 1).all()):
            continue
        producer = None if plan.folded_params else producing_linear(
            m.x, {n for n, other in nodes.items() if other.x is m.x}, set(nodes))
        if not plan.folded_params and producer is None:
            unfoldable.append(m.module)
            continue
        linears[m.module] = plan.scale
        folds.update({name: plan.scale for name in plan.folded_params})
        if producer is not None:
            rows[nodes[producer].module] = plan.scale
    if unfoldable:
        patterns = sorted({"*." + n.rsplit(".", 1)[-1] for n in unfoldable})
        raise OptionError(
            f"recipe {recipe.name!r} scales the input of {len(unfoldable)} linear(s) that neither a norm nor a "
            f"linear's output rows can absorb ({', '.join(repr(n) for n in unfoldable[:3])}"
            f"{', ...' if len(unfoldable) > 3 else ''}), and the compressed-tensors format has no place for such "
            f"a scale: calibrate, compile and export with smooth_skip={patterns!r} in the options (those linears "
            f"are then quantized without input scales)")
    return linears, folds, rows


def _weights(module: nn.Module, recipe: Recipe, name: str, s: Optional[torch.Tensor] = None) -> tuple:
    """(float weight on the quantized grid, scale, zero point in the format's convention or None);
    ``s``: the input scale the weight absorbs (AWQ's prepared codes already have it)."""
    w = module.weight.detach().to(torch.float32)
    prepared = prepared_for(module.weight)
    if prepared is not None and prepared.trained:  # qcompiler.qat: the trained codes and scales
        t = checked_prepared_weight(prepared, name, recipe, "exporting").weight
        if recipe.weight_bits != 4:
            return t.wq.to(torch.float32) * t.wscale[:, None], t.wscale[:, None], None
    elif s is not None and not recipe.calibrated_rounding:
        w = w * s
    if recipe.weight_bits == 4:
        if prepared is not None and prepared.trained:
            packed = prepared.weight
        elif recipe.calibrated_rounding:
            if prepared is None or prepared.weight is None or prepared.key != recipe.prepared_key:
                raise OptionError(f"recipe {recipe.name!r} rounds weights on calibration data, and {name!r} has "
                                  f"none for it: run qcompiler.calibrate(model, batches, recipe={recipe.name!r}) first")
            packed = prepared.weight
        else:
            packed = int4.quantize(w, recipe.group_size, recipe.symmetric)
        grid = packed.dequantize()[:, :w.shape[1]]
        # qcompile's codes are unsigned (u - zero); the format's are signed (q - zp), q = u - 8
        zero = None if packed.zero is None else (packed.zero.to(torch.int16) - 8).to(torch.int8)
        return grid, packed.scale, zero
    wq, scale = ops.quantize_per_channel_ref(w, recipe.qdtype)
    return wq.to(torch.float32) * scale[:, None], scale[:, None], None


def export_checkpoint(model: nn.Module, out_dir: Union[str, os.PathLike], *, recipe="w8a8",
                      tokenizer=None) -> pathlib.Path:
    """Write ``model`` quantized by ``recipe`` as a compressed-tensors Hugging Face folder.

    Args:
        model: a transformers ``PreTrainedModel`` (or ``torch.compile`` of one); it is not changed.
        out_dir: the folder to write (``config.json`` with ``quantization_config``, safetensors).
        recipe: a recipe name, ``Recipe`` or options dict with a compressed-tensors form (see the
            module docstring); INT4 algorithm recipes need ``qcompiler.calibrate(model, batches,
            recipe=...)`` first.
        tokenizer: saved into the folder too when given.

    Returns the folder. ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it
    (with compressed-tensors installed); vLLM serves it.
    """
    recipe = resolve(recipe) if isinstance(recipe, dict) else get_recipe(recipe)
    why = _why_not(recipe)
    if why:
        raise OptionError(f"recipe {recipe.name!r} has no compressed-tensors form: {why}")
    ct = _ct()
    source = unwrap(model)
    if not hasattr(source, "save_pretrained"):
        raise OptionError("export_checkpoint writes Hugging Face model folders: give a transformers model "
                          "(one with save_pretrained)")
    tied = {id(p) for m in source.modules() if not isinstance(m, nn.Linear)
            for p in m.parameters(recurse=False)}
    scales, folds, rows = _input_scales(source, recipe) if recipe.smoothquant or recipe.awq_scales else ({}, {}, {})
    chosen, ignore = {}, []
    for name, module in linear_layers(source):
        r = recipe.for_module(name)
        if type(module) is not nn.Linear or r is None or (id(module.weight) in tied and not recipe.quantize_tied):
            ignore.append(name)
            continue
        if r != recipe:
            raise OptionError(f"{name!r} has a per-module override ({r.name}); one recipe per checkpoint here")
        k = module.weight.shape[1]
        if r.weight_bits == 4 and k % r.group_size:
            raise OptionError(f"{name!r} has {k} input features, not a multiple of group_size={r.group_size}, which "
                              f"the compressed-tensors format needs (qcompile pads; the format does not): pick a "
                              f"group size dividing {k}, or skip the layer (skip=[{name!r}])")
        chosen[name] = _weights(module, r, name, scales.get(name))
    if not chosen:
        raise OptionError(f"recipe {recipe.name!r} quantizes none of this model's linear layers")
    target = copy.deepcopy(source)
    modules = dict(target.named_modules())
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, s in folds.items():
            params[name].copy_(folded_parameter(params[name], s))
        for name, s in rows.items():  # 1/s on the producing linear's rows: its row scales shrink alike
            if name in chosen:
                grid, scale, zero = chosen[name]
                chosen[name] = grid / s[:, None], scale / s[:, None], zero
            else:
                modules[name].weight.copy_(folded_parameter(modules[name].weight, s[:, None]))
            if modules[name].bias is not None:
                modules[name].bias.copy_(folded_parameter(modules[name].bias, s))
    config = ct["QuantizationConfig"](config_groups={"group_0": _scheme(ct, recipe, ["Linear"])},
                                      ignore=ignore, quantization_status=ct["QuantizationStatus"].FROZEN)
    ct["apply_quantization_config"](target, config, show_progress=False)
    with torch.no_grad():
        for name, (grid, scale, zero) in chosen.items():
            m = modules[name]
            m.weight.copy_(grid.to(m.weight.dtype))
            m.weight_scale.copy_(scale.reshape(m.weight_scale.shape).to(m.weight_scale.dtype))
            if hasattr(m, "weight_zero_point"):
                zp = torch.zeros_like(m.weight_zero_point) if zero is None else zero.reshape(
                    m.weight_zero_point.shape).to(m.weight_zero_point.dtype)
                m.weight_zero_point.copy_(zp)
    compressor = ct["ModelCompressor"].from_pretrained_model(target)
    compressor.compress_model(target)
    out = pathlib.Path(out_dir)
    target.save_pretrained(str(out))
    compressor.update_config(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
