"""Recipes: what to quantize and how, as validated dataclasses found by name in a registry.

A recipe is data, never a callable. The backend resolves ``options`` into one ``Recipe``
(``resolve``), and the passes read its fields; nothing else in the pipeline branches on a
recipe's *name*. Adding a recipe is one ``register_recipe(Recipe(...))`` call.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

from qcompiler.errors import OptionError

FLOAT = "fp"  # the override value that keeps a module in floating point

# activation schemes: None = weight-only; "dynamic" = per token at run time; "static" = per
# tensor with a scale fixed from calibration (the form TensorRT's explicit quantization needs)
ACTIVATION_SCHEMES = (None, "dynamic", "static")
# Bounded at 0.8, SmoothQuant's own Llama setting: the per-layer output-error search picks the
# largest alpha it is offered on nearly every SmolLM2 layer, while the model's perplexity gets
# worse above 0.8 (benchmarks/accuracy.py; docs/experiments.md, "alpha='auto'").
DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
DEFAULT_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
NUMBER_FORMATS = ("int", "fp8")
# how embedding tables are stored: None = floating point; "int8" = INT8 per row
EMBEDDING_FORMATS = (None, "int8")
# attention: None = floating point; "int8" / "fp8" = both products on 8-bit operands (qcompiler.ir.attention)
ATTENTION_FORMATS = (None, "int8", "fp8")
# the KV cache compiled generation uses: None = transformers' float cache; else a qcompiler.ir.kv scheme
KV_CACHE_FORMATS = (None, "int8", "fp8", "int4")


@dataclass(frozen=True)
class Algorithm:
    """How an INT4 recipe rounds its weights, as data: whether it runs on calibration data (block by
    block, ``qcompiler.calibrate(model, data, recipe=...)``), whether AWQ's input-channel scales
    come first, and the rounding that follows (a key of ``qcompiler.algorithms.rounding.ROUNDINGS``)."""

    calibrated: bool
    awq_scales: bool
    rounding: str


# recipe.algorithm -> what it needs; a new algorithm is one row here (and a rounding, if new)
ALGORITHMS = {
    "rtn": Algorithm(calibrated=False, awq_scales=False, rounding="nearest"),
    "awq": Algorithm(calibrated=True, awq_scales=True, rounding="nearest"),
    "gptq": Algorithm(calibrated=True, awq_scales=False, rounding="gptq"),
    "awq-gptq": Algorithm(calibrated=True, awq_scales=True, rounding="gptq"),
}
# the recipe fields a prepared INT4 weight depends on: compiling with other values must not reuse it
PREPARED_KEY_FIELDS = ("weight_bits", "group_size", "symmetric", "algorithm", "awq_grid", "weight_clip",
                       "weight_clip_grid", "gptq_damp", "gptq_block", "act_order", "first_token_weight",
                       "refit_scales", "tune_epochs", "tune_lr", "smooth_skip")
# what "auto" may give a linear, smallest first (ties: faster first); "fp" keeps it in floating point
# INT4 candidate: round to nearest. On SmolLM2-135M GPTQ lowers each layer's error on the
# calibration rows yet raises perplexity (benchmarks/accuracy.py), which would mislead the search.
DEFAULT_AUTO_FORMATS = ("w4a16", "w8a8", "w8a16", FLOAT)


@dataclass(frozen=True)
class Recipe:
    """One quantization scheme, with per-module overrides.

    Args:
        name: registry name.
        weight_bits: 8 (INT8 or FP8, symmetric per output channel), 4 (INT4 in groups along K,
            weight-only) or None (weights stay float).
        number_format: "int" or "fp8" (E4M3, for 8-bit weights and activations).
        group_size: INT4 group length along K (a power of two >= 16; K need not be a multiple).
        symmetric: INT4 zero point fixed at 8 (the TensorRT form), else one per group.
        algorithm: how INT4 weights are rounded: "rtn" (round to nearest), "awq" (activation-
            aware scales and clipping), "gptq" (Hessian-based error feedback) or "awq-gptq" (AWQ's
            scales, then GPTQ's rounding); all but "rtn" need
            ``qcompiler.calibrate(model, data, recipe=...)``, which runs them block by block.
        awq_grid: AWQ scale-exponent candidates searched per layer group.
        weight_clip: before rounding, search a clip ratio per (output row, group) of the INT4
            weights against the layer's output error (``qcompiler.algorithms.clip_search``); every algorithm
            (AWQ on its scaled weights, GPTQ before its error feedback). SmolLM2-135M sym g64,
            benchmarks/experiments/int4_eager.py (16 calibration, 16 test windows): GPTQ 22.49 perplexity with
            it against 23.12 without.
        weight_clip_grid: clip ratios tried, evenly from 1 down to 0.5.
        gptq_damp: GPTQ dampening, as a fraction of the Hessian's mean diagonal.
        gptq_block: GPTQ lazy-update block width (columns).
        first_token_weight: weight of each calibration sequence's first token in the rounding
            objectives (GPTQ's Hessians, AWQ's scale and clip searches, the scale refit). A causal
            LM's first token is its attention sink: most heads attend to it,
            so the error of its value projection reaches every later token, while an unweighted
            Hessian counts it once per sequence and GPTQ trades its accuracy away
            (SmolLM2-135M layer 18 ``v_proj``: +4.4% perplexity alone, RTN +0.2%; weight 64: 0.0%).
            The GPTQ recipes default to 64: on SmolLM2's 16 test windows, sym g64, +19.9% perplexity
            against +32.1% unweighted (benchmarks/accuracy.py). AWQ keeps 1: with 64 its searches
            do worse (benchmarks/experiments/int4_eager.py, 16 / 16 windows: 23.17 against 22.90, scale refit on).
        refit_scales: after AWQ / GPTQ chose the codes, refit each row's group scales by least
            squares against the layer's output on the calibration data (``qcompiler.algorithms.scale_refit``).
            On by default for every algorithm recipe (benchmarks/experiments/int4_eager.py, 16 / 16 windows, sym
            g64: AWQ 22.90 perplexity against 23.30 without, AWQ+GPTQ 22.86 against 22.87; GPTQ,
            4 test windows: 18.13 against 19.27). It never raises the calibration error.
        tune_epochs: after the algorithm chose the codes, train every INT4 group scale end to end
            for this many passes over the calibration data, codes fixed, so the quantized model's
            output matches the float model's (``qcompiler.algorithms.scale_tuning``; KL of the next-token
            distributions for a language model). 0 (default) skips it: each step holds the whole
            model's activations for one batch, and it costs a forward and backward pass per batch
            and epoch. SmolLM2-135M sym g64, 32 calibration windows of 512 tokens, 4 epochs
            (benchmarks/accuracy.py, compiled): GPTQ +14.74% -> +9.02% perplexity, AWQ +18.80% ->
            +8.45%, about 135 s per epoch on 2 CPU cores.
        tune_lr: Adam's initial learning rate for ``tune_epochs`` (on the log of each scale),
            decayed to 0 along a cosine.
        act_order: GPTQ processes columns by decreasing Hessian diagonal (groups stay static).
        activation: None (weight-only), "dynamic" (per token) or "static" (per tensor, calibrated).
        observer: how a static activation scale is chosen from calibration data
            (see ``qcompiler.calibration.observers.OBSERVERS``).
        percentile: for the "percentile" observer.
        smoothquant: apply SmoothQuant scaling before activation quantization.
        alpha: SmoothQuant migration strength in [0, 1], or "auto" for a per-layer search over
            ``alpha_grid`` against each layer group's output error on the calibration data.
        alpha_grid: candidates for ``alpha="auto"``.
        clip: static activation range as a fraction of the observer's range (values beyond it
            saturate), or "auto" for a per-layer search over ``clip_grid`` against the output
            error on the calibration data (jointly with ``alpha="auto"``).
        clip_grid: candidates for ``clip="auto"``.
        min_sqnr_db: a linear whose quantized output SQNR against FP32 on the calibration data
            falls below this keeps its activations in floating point: INT8 weights only when that
            clears the floor, else the whole layer in floating point (reported by ``explain``);
            None disables. Needs calibration data; without it nothing is measured or changed.
        max_static_loss_db: static activation recipes: a linear whose SQNR on the calibration
            data is more than this many dB below what per-token (dynamic) activation scales give
            on the same rows (per-token SQNR, every token weighted alike) keeps its activations in
            floating point, as above; None disables.
            One per-tensor scale cannot serve tokens whose ranges differ by orders of magnitude
            (a sentence encoder's special tokens): all-mpnet-base-v2's embeddings collapse without
            it (docs/results/encoder_accuracy.md).
        smooth_skip: module-name patterns (fnmatch) of linears that get no SmoothQuant / AWQ input
            scale: a group of linears reading one input is left unscaled when any member matches
            (quantized as the recipe says otherwise). A compressed-tensors checkpoint can only
            hold these scales folded into a preceding norm or linear, so a linear whose input
            comes from elsewhere (attention's output into ``o_proj``) must be listed here to be
            written; ``export_checkpoint`` names them.
        skip: module-name patterns (fnmatch) kept in floating point.
        quantize_tied: also quantize a linear whose weight the graph uses elsewhere too (a
            language model's output projection tied to its input embedding). Off by default:
            the INT8 copy adds memory instead of saving it, and that projection is the most
            sensitive layer (SmolLM2-135M: +0.2 to +0.6 points of perplexity).
        embedding: None (embedding tables stay in floating point) or "int8": each embedding
            table is stored INT8 per row and its rows dequantized as they are gathered; an output
            projection tied to that table (a language model's lm_head) reads the same INT8 table
            as a weight-only INT8 linear, so the tied weight is stored once, in 8 bits.
        mixed_precision: choose each linear's format from ``auto_formats`` at calibration
            (``qcompiler.calibrate(model, data, recipe="auto")``) so the model is as small as
            possible while its loss on held-out calibration data stays within ``budget``.
        budget: allowed relative perplexity increase for ``mixed_precision`` (0.01 = 1%).
        auto_formats: the recipe names (or "fp") ``mixed_precision`` may assign, smallest first.
        attention: None (attention stays in floating point) or "int8" / "fp8": every
            ``scaled_dot_product_attention`` runs as ``qcompile::attention_q8`` (K smoothed, Q and K
            per token in INT8, softmax in float32, P per block of 64 keys and V per channel in INT8
            or FP8 E4M3).
        kv_cache: None, or "int8" / "fp8" / "int4": from the first decode step of ``generate()``
            the model's key/value cache is a ``qcompiler.QuantizedKVCache`` of this scheme
            (the prompt's own attention runs on floating-point keys and values, as in KIVI).
        kv_group_size: the KV cache's group size (None: 64 for 8-bit, 32 for INT4).
        kv_residual: how many of the most recent tokens the KV cache keeps in floating point.

    Example:
        >>> r = get_recipe("w8a8-smoothquant").replace(alpha=0.8, skip=("lm_head",))
    """

    name: str
    weight_bits: Optional[int] = 8
    number_format: str = "int"
    group_size: Optional[int] = None
    symmetric: bool = True
    algorithm: str = "rtn"
    awq_grid: int = 20
    weight_clip: bool = True
    weight_clip_grid: int = 20
    gptq_damp: float = 0.01
    gptq_block: int = 128
    act_order: bool = False
    first_token_weight: float = 1.0
    refit_scales: bool = False
    tune_epochs: int = 0
    tune_lr: float = 0.004
    activation: Optional[str] = "dynamic"
    observer: str = "minmax"
    percentile: float = 99.99
    smoothquant: bool = False
    alpha: Union[float, str] = 0.5
    alpha_grid: tuple = DEFAULT_ALPHA_GRID
    clip: Union[float, str] = 1.0
    clip_grid: tuple = DEFAULT_CLIP_GRID
    min_sqnr_db: Optional[float] = 20.0
    max_static_loss_db: Optional[float] = 6.0
    smooth_skip: tuple = ()
    skip: tuple = ()
    quantize_tied: bool = False
    embedding: Optional[str] = None
    overrides: tuple = ()
    mixed_precision: bool = False
    budget: float = 0.01
    auto_formats: tuple = DEFAULT_AUTO_FORMATS
    attention: Optional[str] = None
    kv_cache: Optional[str] = None
    kv_group_size: Optional[int] = None
    kv_residual: int = 128
    description: str = field(default="", compare=False)

    def __post_init__(self):
        from qcompiler.calibration.observers import OBSERVERS

        if self.weight_bits not in (None, 8, 4):
            raise OptionError(f"recipe {self.name!r}: weight_bits={self.weight_bits!r}; supported: 8, 4 or None")
        if self.algorithm not in ALGORITHMS:
            raise OptionError(f"recipe {self.name!r}: algorithm={self.algorithm!r}; valid: {sorted(ALGORITHMS)}")
        if self.number_format not in NUMBER_FORMATS:
            raise OptionError(f"recipe {self.name!r}: number_format={self.number_format!r}; valid: {NUMBER_FORMATS}")
        if self.number_format == "fp8" and self.weight_bits != 8:
            raise OptionError(f"recipe {self.name!r}: FP8 needs weight_bits=8, got {self.weight_bits!r}")
        if self.weight_bits == 4:
            gs = self.group_size
            if not (isinstance(gs, int) and gs >= 16 and gs & (gs - 1) == 0):
                raise OptionError(f"recipe {self.name!r}: INT4 needs group_size a power of two >= 16 "
                                  f"(e.g. 32, 64, 128), got {gs!r}")
            if self.activation is not None:
                raise OptionError(f"recipe {self.name!r}: INT4 is weight-only here; set activation=None "
                                  f"(got {self.activation!r})")
        elif self.group_size is not None or ALGORITHMS[self.algorithm].calibrated:
            raise OptionError(f"recipe {self.name!r}: group_size and algorithm apply to 4-bit weights "
                              f"(weight_bits=4), got weight_bits={self.weight_bits!r}")
        if not self.first_token_weight >= 1.0:
            raise OptionError(f"recipe {self.name!r}: first_token_weight must be >= 1 (1 = every token "
                              f"alike), got {self.first_token_weight!r}")
        if not 0.0 < self.gptq_damp < 1.0 or self.gptq_block < 1 or self.awq_grid < 1 or \
                self.weight_clip_grid < 1:
            raise OptionError(f"recipe {self.name!r}: gptq_damp must be in (0, 1), gptq_block, awq_grid and "
                              f"weight_clip_grid >= 1")
        if not (isinstance(self.tune_epochs, int) and self.tune_epochs >= 0) or not self.tune_lr > 0:
            raise OptionError(f"recipe {self.name!r}: tune_epochs must be an integer >= 0 and tune_lr > 0, "
                              f"got {self.tune_epochs!r}, {self.tune_lr!r}")
        if self.tune_epochs and not self.calibrated_rounding:
            raise OptionError(f"recipe {self.name!r}: tune_epochs trains the scales of calibrated INT4 weights; "
                              f"use it with an INT4 algorithm (w4a16-awq, w4a16-gptq, w4a16-awq-gptq), "
                              f"not weight_bits={self.weight_bits!r} / algorithm={self.algorithm!r}")
        if not 0.0 < self.budget:
            raise OptionError(f"recipe {self.name!r}: budget must be > 0 (0.01 = 1% perplexity), got {self.budget!r}")
        if self.activation not in ACTIVATION_SCHEMES:
            raise OptionError(f"recipe {self.name!r}: activation={self.activation!r}; "
                              f"valid: {ACTIVATION_SCHEMES}")
        if self.activation is not None and self.weight_bits is None:
            raise OptionError(f"recipe {self.name!r}: activation quantization needs quantized weights")
        if self.observer not in OBSERVERS:
            raise OptionError(f"recipe {self.name!r}: unknown observer {self.observer!r}; "
                              f"valid: {sorted(OBSERVERS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise OptionError(f"recipe {self.name!r}: percentile must be in (0, 100], got {self.percentile}")
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise OptionError(f"recipe {self.name!r}: alpha must be in [0, 1] or 'auto', got {self.alpha!r}")
        if self.clip != "auto" and not (isinstance(self.clip, (int, float)) and 0.0 < self.clip <= 1.0):
            raise OptionError(f"recipe {self.name!r}: clip must be in (0, 1] or 'auto', got {self.clip!r}")
        for name in ("min_sqnr_db", "max_static_loss_db"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v)):
                raise OptionError(f"recipe {self.name!r}: {name} must be a number of dB or None, got {v!r}")
        if self.clip != 1.0 and self.activation != "static":
            raise OptionError(f"recipe {self.name!r}: clip applies to static activation scales, but "
                              f"activation={self.activation!r}")
        if self.embedding not in EMBEDDING_FORMATS:
            raise OptionError(f"recipe {self.name!r}: embedding={self.embedding!r}; valid: {EMBEDDING_FORMATS}")
        if self.attention not in ATTENTION_FORMATS:
            raise OptionError(f"recipe {self.name!r}: attention={self.attention!r}; valid: {ATTENTION_FORMATS}")
        if self.kv_cache not in KV_CACHE_FORMATS:
            raise OptionError(f"recipe {self.name!r}: kv_cache={self.kv_cache!r}; valid: {KV_CACHE_FORMATS}")
        gs = self.kv_group_size
        if gs is not None and not (isinstance(gs, int) and gs >= 1 and gs & (gs - 1) == 0):
            raise OptionError(f"recipe {self.name!r}: kv_group_size must be a power of two (e.g. 32, 64), got {gs!r}")
        if not (isinstance(self.kv_residual, int) and self.kv_residual >= 0):
            raise OptionError(f"recipe {self.name!r}: kv_residual must be a number of tokens >= 0, "
                              f"got {self.kv_residual!r}")
        if self.smoothquant and self.activation is None:
            raise OptionError(f"recipe {self.name!r}: SmoothQuant needs activation quantization")
        # normalise containers given as lists / dicts (e.g. from options) to hashable tuples
        for name in ("skip", "smooth_skip"):
            patterns = (getattr(self, name),) if isinstance(getattr(self, name), str) else getattr(self, name)
            if not all(isinstance(p, str) for p in patterns):
                raise OptionError(f"recipe {self.name!r}: {name} takes module-name patterns (strings), got {patterns!r}")
            object.__setattr__(self, name, tuple(patterns))
        ov = self.overrides.items() if isinstance(self.overrides, Mapping) else self.overrides
        object.__setattr__(self, "overrides", tuple((str(p), str(r)) for p, r in ov))
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        object.__setattr__(self, "clip_grid", tuple(float(c) for c in self.clip_grid))
        object.__setattr__(self, "auto_formats", tuple(self.auto_formats))

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
    def needs_calibration(self) -> bool:
        """Static activation scales, searches and weight-rounding algorithms need calibration data."""
        return self.activation == "static" or self.smoothquant or self.rounds_weights

    def replace(self, **changes) -> "Recipe":
        """A copy with some fields changed; unknown field names are an error listing valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - valid)
        if unknown:
            raise OptionError(f"unknown recipe field(s) {unknown}; valid fields: {sorted(valid - {'description'})}")
        return dataclasses.replace(self, **changes)

    def smooth_skipped(self, module_name: str) -> bool:
        """Whether ``module_name``'s input gets no SmoothQuant / AWQ scale (``smooth_skip``)."""
        return any(fnmatch.fnmatchcase(module_name, p) for p in self.smooth_skip)

    def for_module(self, module_name: str) -> Optional["Recipe"]:
        """The recipe that applies to ``module_name``, or None when it stays in floating point."""
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.skip):
            return None
        for pattern, target in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return None if target == FLOAT else get_recipe(target)
        return self


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
