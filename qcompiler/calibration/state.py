"""The quantization state a model owns: what calibration recorded and what algorithms prepared.

One ``QuantState`` per model, kept on the model itself (``model._qcompile_state``) and created on
first use by ``state_of(model)``. It holds, per linear layer (by qualified module name):

- ``stats``: the ``ActivationStats`` calibration recorded at the layer's input;
- ``attention``: per module that calls ``scaled_dot_product_attention``, the ``AttentionStats`` of
  its query, key and value;
- ``prepared``: the ``PreparedWeight`` an algorithm (AWQ, GPTQ, tuning, ``auto``) left for it;
- ``sources``: a sketch of the weight each prepared layer was made from (``weight_sketch``), so a
  weight changed since (in place, or a saved state loaded into a fine-tuned model) is noticed;
- ``last_run``: what the last weight-preparing run did (algorithm, seconds, losses);
- ``generation``: bumped on every change, so compiled graphs know when to rebuild.

The backend sees parameters, not the model, so each linear weight carries a link back
(``weight._qcompile_link = (state, name)``). Two models, two compiles or a deep copy never share
a state: ``copy.deepcopy(model)`` copies the state and links the copy's own parameters to it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from qcompiler.errors import CalibrationError

# a weight whose sketch moved by more than this (relative) is not the one its codes were made from;
# rounding a weight to bf16 moves it by about 1e-3
SKETCH_TOLERANCE = 5e-3
ATTRIBUTE = "_qcompile_state"
LINK = "_qcompile_link"


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's linear, ``x @ W + b`` with ``W`` stored ``[in, out]``), found
    by duck typing so that transformers is not imported here."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or is_conv1d(mod)


def linear_layers(model: nn.Module):
    """``(name, module)`` for every linear layer: ``nn.Linear`` and ``Conv1D``."""
    for name, mod in model.named_modules():
        if is_linear(mod):
            yield name, mod


def linear_weight(mod: nn.Module) -> Tensor:
    """A linear layer's weight as ``F.linear`` takes it, ``[out, in]`` (a view of the parameter)."""
    return mod.weight.t() if is_conv1d(mod) else mod.weight


def stored_weight(mod: nn.Module, weight: Tensor) -> Tensor:
    """An ``[out, in]`` weight in the layout the layer stores its own (``linear_weight``'s inverse)."""
    return weight.t() if is_conv1d(mod) else weight


@dataclass
class QuantState:
    """Everything quantization learned about one model; see the module docstring."""

    weights: dict = field(default_factory=dict, repr=False)   # module name -> its weight Parameter
    stats: dict = field(default_factory=dict)                 # module name -> ActivationStats
    attention: dict = field(default_factory=dict)             # module name -> AttentionStats
    prepared: dict = field(default_factory=dict)              # module name -> PreparedWeight
    sources: dict = field(default_factory=dict, repr=False)   # module name -> weight_sketch at preparation
    last_run: dict = field(default_factory=dict)
    generation: int = 0

    def link(self, model: nn.Module) -> None:
        """Point every linear weight of ``model`` at this state (names relative to ``model``)."""
        for name, mod in linear_layers(model):
            self.weights[name] = mod.weight
            setattr(mod.weight, LINK, (self, name))

    def name_of(self, weight: Tensor) -> Optional[str]:
        link = weight.__dict__.get(LINK)
        return link[1] if link is not None and link[0] is self else None

    def update(self, *, stats: Optional[dict] = None, prepared: Optional[dict] = None,
               last_run: Optional[dict] = None, attention: Optional[dict] = None,
               sources: Optional[dict] = None) -> None:
        """Record new statistics / prepared weights, keyed by weight Parameter or module name
        (attention statistics by module name). ``sources``: the prepared weights' sketches
        (``weight_sketch``) by name where the caller has just computed them; the others are
        computed here."""
        self.attention.update(attention or {})
        for source, target in ((stats, self.stats), (prepared, self.prepared)):
            for key, value in (source or {}).items():
                name = key if isinstance(key, str) else self.name_of(key)
                if name is None:
                    raise ValueError("a weight that is not one of this model's linear layers was given to "
                                     "the quantization state")
                target[name] = value
        for name in (prepared or {}):
            name = name if isinstance(name, str) else self.name_of(name)
            if name in self.weights:
                known = (sources or {}).get(name)
                self.sources[name] = known if known is not None else weight_sketch(self.weights[name])
        if last_run is not None:
            self.last_run = dict(last_run)
        self.generation += 1

    def changed_since_prepared(self, names) -> list:
        """The layers among ``names`` whose weight is no longer the one their prepared codes were
        made from (a layer prepared before sketches were kept is taken as unchanged)."""
        return [n for n in names if n in self.prepared and n in self.sources and n in self.weights
                and not sketches_agree(weight_sketch(self.weights[n]), self.sources[n])]

    def clear(self) -> None:
        self.stats.clear()
        self.attention.clear()
        self.prepared.clear()
        self.sources.clear()
        self.last_run = {}
        self.generation += 1

    def __deepcopy__(self, memo):
        new = QuantState.__new__(QuantState)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        for name, weight in new.weights.items():  # the copied model's own parameters (same memo)
            setattr(weight, LINK, (new, name))
        return new


def weight_sketch(weight: Tensor) -> Tensor:
    """``W @ r`` for a fixed random sign vector ``r``: one number per output row that moves with
    any change of the row, computed where the weight lives (one float32 GEMV, far inside the
    tolerance; a hash of the bytes would copy the weight to the host), kept on the CPU."""
    w = weight.detach().reshape(weight.shape[0], -1)
    signs = torch.randint(0, 2, (w.shape[1],), generator=torch.Generator().manual_seed(0)) * 2 - 1
    return (w.to(torch.float32) @ signs.to(w.device, torch.float32)).to("cpu", torch.float64)


def sketches_agree(now: Tensor, then: Tensor) -> bool:
    if now.shape != then.shape:
        return False
    return bool((now - then).norm() <= SKETCH_TOLERANCE * then.norm().clamp_min(1e-30))


def unwrap(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its ``OptimizedModule`` keeps it as ``_orig_mod``)."""
    return getattr(model, "_orig_mod", model)


def state_of(model: nn.Module) -> QuantState:
    """The model's quantization state, created (and its weights linked) on first use."""
    model = unwrap(model)
    state = model.__dict__.get(ATTRIBUTE)
    if state is None:
        state = QuantState()
        object.__setattr__(model, ATTRIBUTE, state)
    state.link(model)  # cheap, and covers linears added since the last call
    return state


def linked_state(weight: Tensor) -> tuple:
    """``(QuantState, module name)`` of the model that owns ``weight``, or ``(None, None)``."""
    return weight.__dict__.get(LINK) or (None, None)  # __dict__: no exception on the hot path


def stats_for(weight: Tensor):
    state, name = linked_state(weight)
    return None if state is None else state.stats.get(name)


def prepared_for(weight: Tensor):
    state, name = linked_state(weight)
    return None if state is None else state.prepared.get(name)


def checked_prepared_weight(prepared, module: str, recipe, before: str):
    """``prepared`` (a layer's ``PreparedWeight`` or None) as ``recipe`` may use it before ``before``
    ("compiling"): trained weights (``qcompiler.qat``) must have been trained for this recipe, AWQ /
    GPTQ codes must exist and have been made for its INT4 settings; None when the recipe rounds
    without calibration and the layer was not trained."""
    if prepared is not None and prepared.trained:
        if prepared.key != recipe.trained_key:
            raise CalibrationError(
                f"{module!r} was trained (qcompiler.qat) for recipe {prepared.recipe.name!r} {prepared.key}, not for "
                f"recipe {recipe.name!r} {recipe.trained_key}: use the options it was trained with, or drop the "
                f"trained codes with qcompiler.calibration.state.forget(model)")
        return prepared
    if not recipe.calibrated_rounding:
        return None
    fix = (f"run `qcompiler.calibrate(model, batches, recipe={recipe.name!r})` (with the same recipe "
           f"options) before {before}")
    if prepared is None or prepared.weight is None:
        raise CalibrationError(f"recipe {recipe.name!r} rounds weights with {recipe.algorithm.upper()} on "
                               f"calibration data, but {module!r} has no prepared weight: {fix}")
    if prepared.key != recipe.prepared_key:
        raise CalibrationError(f"{module!r} was calibrated for a different INT4 setting {prepared.key} "
                               f"than the recipe asks for {recipe.prepared_key}: {fix}")
    return prepared


def store_prepared(model: nn.Module, prepared: dict, stats: Optional[dict] = None,
                   last_run: Optional[dict] = None) -> None:
    """Keep prepared weights (and the activation statistics the same run recorded) in the
    model's quantization state; keys are the model's linear weights."""
    state_of(model).update(stats=stats, prepared=prepared, last_run=last_run)


def forget(model: nn.Module) -> None:
    """Drop the calibration statistics and prepared weights of ``model`` (compiled graphs rebuild)."""
    state_of(model).clear()
