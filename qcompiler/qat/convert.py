"""``qcompiler.qat.convert``: the trained codes and scales into the model's quantization state.

Each ``QATLinear`` gives way to the layer it replaced (same module, same Parameters). Its weight
becomes the trained weight on its grid (codes times the learned scales, divided by AWQ's ``s``),
and the model's ``QuantState`` gets a ``PreparedWeight`` per layer marked ``trained``: the codes
and scales in the scheme's own form, the learned static activation scale, AWQ's ``s``. The
quantize pass, ``qcompiler.save``, ``export_onnx`` and ``export_checkpoint`` then use exactly the
trained values, with no calibration, for the recipe the model was trained with (another recipe
is refused by name). ``requires_grad`` is back to what it was before ``prepare``.
"""
from __future__ import annotations

import torch
from torch import nn

from qcompiler.calibration.state import state_of, stored_weight, unwrap
from qcompiler.calibration.stats import PreparedWeight
from qcompiler.errors import OptionError, TrainingError
from qcompiler.qat.prepare import RUN, qat_layers, run_of
from qcompiler.schemes import fake_quant


def _changed(run, layers: dict) -> str:
    """What differs between the layers ``prepare`` made and the ones the model has now ("" if none)."""
    missing, added = sorted(set(run.layers) - set(layers)), sorted(set(layers) - set(run.layers))
    reshaped = sorted(n for n, q in layers.items() if n in run.layers and tuple(q.weight.shape) != run.layers[n])
    moved = sorted(n for n, q in layers.items() if q.name != n)
    parts = [f"{label}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
             for label, names in (("missing", missing), ("added", added), ("weight shape changed", reshaped),
                                  ("moved", moved)) if names]
    return "; ".join(parts)


def convert(model: nn.Module) -> nn.Module:
    """Finish quantization-aware training: trained codes into the quantization state (in place; returned).

    Then ``torch.compile(model, backend="qcompile", options=<the recipe it was prepared with>)``,
    ``qcompiler.save``, ``qcompiler.export_onnx`` and ``qcompiler.export_checkpoint`` use them.
    """
    model = unwrap(getattr(model, "module", model))
    run = run_of(model)
    layers = qat_layers(model)
    changed = _changed(run, layers)
    if changed:
        raise OptionError(f"the model changed between qcompiler.qat.prepare and convert ({changed}): convert the "
                          f"model that was prepared, unchanged in its quantized layers")
    shared = {}  # one AWQ scale tensor per group of layers that shared it at prepare (the smooth pass folds it once)
    prepared = {}
    with torch.no_grad():
        for name, q in layers.items():
            s = q.smooth_scale
            if s is not None:
                s = shared.setdefault(run.smooth_groups.get(name, name), s.detach().clone())
            trained = q.scheme.trained_weight(q.scaled_weight(), q.weight_scale, q.weight_zero, q.recipe)
            on_grid = q.quantized_weight()
            if not torch.isfinite(on_grid).all():
                raise TrainingError(f"{name!r}: its trained weight is not finite; the training diverged (lower the "
                                  f"learning rate and train again from a fresh prepare)")
            source = q.source
            source.weight, source.bias = q.weight, q.bias
            source.weight.copy_(stored_weight(source, on_grid if s is None else on_grid / s).to(q.weight.dtype))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, source)
            x_scale = None if q.input_scale is None else \
                fake_quant.positive(q.input_scale.detach().to(torch.float32)).reshape(())
            steps = f"{run.steps} steps" if run.steps else "no distill steps"
            prepared[name] = PreparedWeight(q.recipe, q.recipe.trained_key, trained, s,
                                            f"trained (qcompiler.qat, {steps})", trained=True, x_scale=x_scale)
    for n, p in model.named_parameters():
        p.requires_grad_(run.requires_grad.get(n, p.requires_grad))
    state_of(model).update(prepared=prepared)
    model.__dict__.pop(RUN, None)
    return model
