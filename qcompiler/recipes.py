"""Recipes: what to quantize and how, as validated dataclasses found by name in a registry.

A recipe is data, never a callable. The backend resolves ``options`` into one ``Recipe``
(``resolve``), and the passes read its fields; nothing else in the pipeline branches on a
recipe's *name*. Adding a recipe is one ``register_recipe(Recipe(...))`` call.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from qcompiler.errors import OptionError
from qcompiler.recipe_specs import (ALGORITHMS, FIELD_SPEC, FLOAT, SPECS, Activations, Attention, Guards, KVCache,
                                    MixedPrecision, Rounding, Smoothing, Weights, patterns)
from qcompiler.schemes.registry import SCHEMES, SchemeKey

# the recipe fields a prepared INT4 weight depends on: compiling with other values must not reuse it
PREPARED_KEY_FIELDS = ("weight_bits", "group_size", "symmetric", "algorithm", "awq_grid", "weight_clip",
                       "weight_clip_grid", "gptq_damp", "gptq_block", "act_order", "first_token_weight",
                       "refit_scales", "tune_epochs", "tune_lr", "smooth_skip")
# what a recipe holds besides its specs
OWN_FIELDS = ("name", "skip", "overrides", "description")


@dataclass(frozen=True, init=False)
class Recipe:
    """One quantization scheme, with per-module overrides: a name and the specs it is made of
    (``qcompiler.recipe_specs``), each with its defaults and its checks:

    * ``weights`` (``Weights``): weight_bits, number_format, group_size, symmetric, quantize_tied, embedding;
    * ``activations`` (``Activations``): activation (None / "dynamic" / "static"), activation_format,
      observer, percentile, clip, clip_grid;
    * ``rounding`` (``Rounding``): how INT4 weights are rounded (algorithm "rtn" / "awq" / "gptq" /
      "awq-gptq", all but "rtn" calibrated block by block by ``qcompiler.calibrate(model, data,
      recipe=...)``) and the algorithms' settings;
    * ``smoothing`` (``Smoothing``): smoothquant, alpha (or "auto"), alpha_grid, smooth_skip;
    * ``guards`` (``Guards``): min_sqnr_db, max_static_loss_db, the measured fallbacks to floating point;
    * ``mixed`` (``MixedPrecision``): mixed_precision, budget, auto_formats (the "auto" recipe);
    * ``attn`` (``Attention``): attention (None / "int8" / "fp8");
    * ``kv`` (``KVCache``): kv_cache, kv_group_size, kv_residual (``generate()``'s quantized cache).

    Besides them: ``skip``, module-name patterns (fnmatch) kept in floating point, and ``overrides``,
    pattern -> a recipe name, "fp" (floating point), or a dict of fields merged onto this recipe for
    the matching modules (``{"*.down_proj": {"group_size": 32}}``); the first matching pattern wins.
    Why each default is what it is, measured: docs/experiments.md.

    A recipe is made from specs or from the flat fields a user writes as options, and reads back
    either way: ``recipe.weights.group_size`` or ``recipe.group_size``. Its quantized linears take
    the scheme registered for its ``scheme_key`` (``qcompiler.schemes``).

    Example:
        >>> r = get_recipe("w8a8-smoothquant").replace(alpha=0.8, skip=("lm_head",))
        >>> r = get_recipe("w4a16").replace(overrides={"*.down_proj": {"group_size": 32}, "lm_head": "w8a16"})
    """

    name: str
    weights: Weights
    activations: Activations
    rounding: Rounding
    smoothing: Smoothing
    guards: Guards
    mixed: MixedPrecision
    attn: Attention
    kv: KVCache
    skip: tuple
    overrides: tuple
    description: str = field(compare=False)

    def __init__(self, name: str, *, skip=(), overrides=(), description: str = "", **parts_and_fields):
        parts = {p: parts_and_fields.pop(p) for p in list(parts_and_fields) if p in SPECS}
        unknown = sorted(set(parts_and_fields) - set(FIELD_SPEC))
        if unknown:
            raise OptionError(f"unknown recipe field(s) {unknown}; valid fields: {sorted(fields_of_recipes())}")
        put = functools.partial(object.__setattr__, self)
        put("name", name)
        put("description", description)
        try:
            for part, cls in SPECS.items():
                own = {k: v for k, v in parts_and_fields.items() if FIELD_SPEC[k] == part}
                spec = parts.get(part)
                put(part, dataclasses.replace(spec, **own) if spec is not None else cls(**own))
            put("skip", patterns("skip", skip))
            put("overrides", _overrides(overrides))
            self._check()
        except OptionError as e:
            raise OptionError(f"recipe {name!r}: {e}") from None
        for pattern, target in self.overrides:
            if isinstance(target, tuple):  # a dict of fields: check it now
                try:
                    _merged(self, target)
                except OptionError as e:
                    raise OptionError(f"{e} (in the override of {pattern!r})") from None

    def _check(self) -> None:
        """What no one spec can check alone."""
        if self.weight_bits is None and self.activation is not None:
            raise OptionError("activation quantization needs quantized weights")
        if self.weight_bits != 4 and (self.group_size is not None or ALGORITHMS[self.algorithm].calibrated):
            raise OptionError(f"group_size and algorithm apply to 4-bit weights (weight_bits=4), got "
                              f"weight_bits={self.weight_bits!r}")
        if self.tune_epochs and not self.calibrated_rounding:
            raise OptionError(f"tune_epochs trains the scales of calibrated INT4 weights; use it with an INT4 "
                              f"algorithm (w4a16-awq, w4a16-gptq, w4a16-awq-gptq), not weight_bits="
                              f"{self.weight_bits!r} / algorithm={self.algorithm!r}")
        if self.smoothquant and self.activation is None:
            raise OptionError("SmoothQuant needs activation quantization")
        key = self.scheme_key
        if key is not None and key not in SCHEMES:
            SCHEMES.get(key)  # the error naming the registered schemes

    def __getattr__(self, name: str):
        part = FIELD_SPEC.get(name)
        if part is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__[part], name)

    def as_fields(self) -> dict:
        """The recipe as flat fields (what ``Recipe(**fields)`` makes again): options, manifests."""
        out = {"name": self.name}
        for part in SPECS:
            spec = getattr(self, part)
            out.update({f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
        out.update(skip=self.skip, overrides=tuple((p, dict(t) if isinstance(t, tuple) else t)
                                                   for p, t in self.overrides), description=self.description)
        return out

    @property
    def scheme_key(self) -> Optional[SchemeKey]:
        """The ``SchemeKey`` of this recipe's quantized linears, or None (weights stay float)."""
        weights = self.weights.format
        if weights is None:
            return None
        if self.activation is None:
            return SchemeKey(weights)
        acts = self.activation_format or ("fp8" if self.number_format == "fp8" else "int8")
        return SchemeKey(weights, acts, self.activation)

    @property
    def attention_qdtype(self):
        """The torch dtype of quantized attention's operands (None: attention stays in floating point)."""
        import torch

        return {None: None, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[self.attention]

    @property
    def qdtype(self):
        """The torch dtype of 8-bit weights and activations."""
        import torch

        return torch.float8_e4m3fn if self.number_format == "fp8" else torch.int8

    @property
    def calibrated_rounding(self) -> bool:
        """INT4 weights whose rounding runs on calibration data (AWQ, GPTQ)."""
        return self.weight_bits == 4 and ALGORITHMS[self.algorithm].calibrated

    @property
    def awq_scales(self) -> bool:
        """INT4 weights scaled per input channel by AWQ before rounding (the input divided by the scale)."""
        return self.weight_bits == 4 and ALGORITHMS[self.algorithm].awq_scales

    @property
    def rounds_weights(self) -> bool:
        """Weights come from a calibration-time algorithm (AWQ, GPTQ, or the auto assignment)."""
        return self.calibrated_rounding or self.mixed_precision

    @property
    def prepared_key(self) -> tuple:
        """The values of the fields a prepared INT4 weight was made for (``PREPARED_KEY_FIELDS``)."""
        return tuple(getattr(self, f) for f in PREPARED_KEY_FIELDS)

    @property
    def trained_key(self) -> tuple:
        """What a weight trained by ``qcompiler.qat`` was trained for: the prepared key and the scheme."""
        return (*self.prepared_key, str(self.scheme_key), self.activation)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales, searches and weight-rounding algorithms need calibration data."""
        return self.activation == "static" or self.smoothquant or self.rounds_weights

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields (flat, or whole specs) changed; an unknown name is an error
        listing the valid ones."""
        fields = self.as_fields()
        specs = {p: changes.pop(p) for p in list(changes) if p in SPECS}
        for part in specs:  # a whole spec replaces its flat fields
            for name in [k for k, v in FIELD_SPEC.items() if v == part]:
                fields.pop(name)
        fields.update(changes)
        return Recipe(**fields, **specs)

    def smooth_skipped(self, module_name: str) -> bool:
        """Whether ``module_name``'s input gets no SmoothQuant / AWQ scale (``smooth_skip``)."""
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.smooth_skip)

    def for_module(self, module_name: str) -> Optional["Recipe"]:
        """The recipe that applies to ``module_name``, or None when it stays in floating point."""
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.skip):
            return None
        for pattern, target in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                if isinstance(target, tuple):
                    return _merged(self, target)
                return None if target == FLOAT else get_recipe(target)
        return self


@functools.lru_cache(maxsize=256)
def _merged(recipe: Recipe, items: tuple) -> Recipe:
    """``recipe`` with an override's fields merged on (and no overrides of its own)."""
    bad = sorted(k for k, _ in items if k in OWN_FIELDS)
    if bad:
        raise OptionError(f"an override's fields cannot change {bad}")
    return recipe.replace(overrides=(), **dict(items))


def fields_of_recipes() -> set:
    """Every field a recipe takes by name (options, ``replace``), besides its name and description."""
    return set(FIELD_SPEC) | {"skip", "overrides"}


def _hashable(v):
    return tuple(_hashable(x) for x in v) if isinstance(v, (list, tuple)) else v


def _overrides(value) -> tuple:
    """pattern -> recipe name or fields, as a hashable tuple: ((pattern, name | ((field, value), ...)), ...)."""
    out = []
    for pattern, target in (value.items() if isinstance(value, Mapping) else value):
        if isinstance(target, Mapping):
            target = tuple(sorted((str(k), _hashable(v)) for k, v in target.items()))
        elif not isinstance(target, (str, tuple)):
            raise OptionError(f"an override maps a module-name pattern to a recipe name or a dict of fields, "
                              f"got {pattern!r}: {target!r}")
        out.append((str(pattern), target))
    return tuple(out)


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry (its name must be new)."""
    if recipe.name in _RECIPES:
        raise OptionError(f"recipe {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: Union[str, Recipe]) -> Recipe:
    """Look a recipe up by name; an unknown name is an error that lists the valid ones."""
    if isinstance(name, Recipe):
        return name
    try:
        return _RECIPES[name]
    except KeyError:
        raise OptionError(f"unknown recipe {name!r}; valid recipes: {list_recipes()}") from None


def resolve(options: Optional[Mapping] = None, default: str = "w8a8") -> Recipe:
    """``options`` -> Recipe: ``recipe`` names the base, any other recipe field overrides it."""
    options = dict(options or {})
    recipe = get_recipe(options.pop("recipe", default))
    return recipe.replace(**options) if options else recipe


register_recipe(Recipe("w8a8", description="INT8 weights per channel, INT8 activations dynamic per token"))
register_recipe(Recipe("w8a8-blocks", activation="blocks", quantize_tied=True,
                       description="INT8 weights per channel, INT8 activations per block of 32 channels (llama.cpp "
                                   "Q8_0's grain; ONNX Runtime's MatMulNBits on the CPU); a tied lm_head too"))
register_recipe(Recipe("w8a8-static", activation="static",
                       description="INT8 weights per channel, INT8 activations per tensor (calibrated)"))
# alpha 0.5: the per-layer search (alpha="auto") overfits small calibration sets (a tiny Gemma-3
# config calibrated on 64 tokens: 14.7 dB against 20.1 dB at 0.5); the static-scale guard
# (max_static_loss_db) is what keeps a sentence encoder from collapsing (docs/experiments.md)
register_recipe(Recipe("w8a8-smoothquant", activation="static", smoothquant=True,
                       description="SmoothQuant + static per-tensor INT8 activations (TensorRT form)"))
register_recipe(Recipe("w8a8-smoothquant-dynamic", activation="dynamic", smoothquant=True,
                       description="SmoothQuant + dynamic per-token INT8 activations"))
register_recipe(Recipe("w8a16", activation=None, description="INT8 weight-only, per output channel"))
register_recipe(Recipe("fp8", number_format="fp8",
                       description="FP8 E4M3 weights per channel, FP8 activations dynamic per token"))
register_recipe(Recipe("fp8-static", number_format="fp8", activation="static",
                       description="FP8 E4M3 weights per channel, FP8 activations per tensor (TensorRT form)"))
# No SQNR floor for INT4: 4-bit layers sit near 20 dB by nature, and a floor would silently keep
# many of them in floating point (the user asked for 4 bits; ``auto`` is the way to mix).
_INT4 = dict(weight_bits=4, activation=None, group_size=128, symmetric=True, min_sqnr_db=None)
register_recipe(Recipe("w4a16", **_INT4, description="INT4 weight-only in groups, round to nearest"))
register_recipe(Recipe("w4a16-awq", **_INT4, algorithm="awq", refit_scales=True,
                       description="INT4 weight-only in groups, AWQ scales and clipping (calibrated)"))
register_recipe(Recipe("w4a16-gptq", **_INT4, algorithm="gptq", act_order=True, first_token_weight=64.0,
                       refit_scales=True,
                       description="INT4 weight-only in groups, GPTQ rounding (calibrated)"))
register_recipe(Recipe("w4a16-awq-gptq", **_INT4, algorithm="awq-gptq", act_order=True, first_token_weight=64.0,
                       refit_scales=True,
                       description="INT4 weight-only in groups, AWQ scales then GPTQ rounding (calibrated)"))
register_recipe(Recipe("auto", mixed_precision=True, activation=None, weight_bits=None,
                       description="per-layer choice of FP / w8a8 / w8a16 / w4a16 under a perplexity budget"))
