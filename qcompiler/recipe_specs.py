"""The parts a ``Recipe`` is made of: small frozen specs, each with its defaults and its checks.

A field's name is the option a user writes (``options={"group_size": 64}``), unique across the
specs, so a flat option finds its spec (``FIELD_SPEC``). A spec checks its own fields when made and
raises ``OptionError`` without the recipe's name (the recipe adds it); checks across specs are the
recipe's (``qcompiler.recipes``). Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

from qcompiler.errors import OptionError

FLOAT = "fp"  # the override / auto-format value that keeps a module in floating point
NUMBER_FORMATS = ("int", "fp8")
# activations: None = weight-only; "dynamic" = per token at run time; "blocks" = per block of 32
# input channels at run time (INT8; llama.cpp Q8_0's grain); "static" = per tensor with a scale
# fixed from calibration (the form TensorRT's explicit quantization needs)
ACTIVATION_SCHEMES = (None, "dynamic", "blocks", "static")
# an activation number format other than the weights' (None: the weights' own)
ACTIVATION_FORMATS = (None, "int8", "fp8")
# Bounded at 0.8, SmoothQuant's own Llama setting: the per-layer output-error search picks the
# largest alpha it is offered on nearly every SmolLM2 layer, while the model's perplexity gets
# worse above 0.8 (benchmarks/accuracy.py; docs/experiments.md, "alpha='auto'").
DEFAULT_ALPHA_GRID = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
DEFAULT_CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
EMBEDDING_FORMATS = (None, "int8")  # None = floating point; "int8" = INT8 per row
ATTENTION_FORMATS = (None, "int8", "fp8")  # both products on 8-bit operands (qcompiler.ir.attention)
# the KV cache compiled generation uses: None = transformers' float cache; else a qcompiler.ir.kv scheme
KV_CACHE_FORMATS = (None, "int8", "fp8", "int4")
DEFAULT_KV_GROUP = {"int8": 64, "fp8": 64, "int4": 32}
DEFAULT_KV_RESIDUAL = 128
# what "auto" may give a linear, smallest first (ties: faster first); "fp" keeps it in floating point.
# INT4 candidate: round to nearest. On SmolLM2-135M GPTQ lowers each layer's error on the
# calibration rows yet raises perplexity (benchmarks/accuracy.py), which would mislead the search.
DEFAULT_AUTO_FORMATS = ("w4a16", "w8a8", "w8a16", FLOAT)


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


def _power_of_two(v, least: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least and v & (v - 1) == 0


def patterns(name: str, value) -> tuple:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise OptionError(f"{name} takes module-name patterns (strings), got {patterns!r}")
    return patterns


def _set(spec, name: str, value) -> None:
    object.__setattr__(spec, name, value)  # normalising a frozen spec's field as it is made


@dataclass(frozen=True)
class Weights:
    """Which weights are quantized and to what.

    weight_bits: 8 (INT8 or FP8, symmetric per output channel), 4 (INT4 in groups along K) or
        None (weights stay float). number_format: "int" or "fp8" (E4M3, 8-bit only).
    group_size: INT4 group length along K (a power of two >= 16; K need not be a multiple).
    symmetric: INT4 zero point fixed at 8 (the TensorRT form), else one per group.
    quantize_tied: also quantize a linear whose weight the graph uses elsewhere too (a language
        model's output projection tied to its input embedding). Off by default: the INT8 copy adds
        memory instead of saving it, and that projection is the most sensitive layer (SmolLM2-135M:
        +0.2 to +0.6 points of perplexity).
    embedding: None (embedding tables stay in floating point) or "int8": each table stored INT8
        per row, rows dequantized as they are gathered; an output projection tied to that table (a
        language model's lm_head) reads the same INT8 table as a weight-only INT8 linear.
    """

    weight_bits: Optional[int] = 8
    number_format: str = "int"
    group_size: Optional[int] = None
    symmetric: bool = True
    quantize_tied: bool = False
    embedding: Optional[str] = None

    def __post_init__(self):
        if self.weight_bits not in (None, 8, 4):
            raise OptionError(f"weight_bits={self.weight_bits!r}; supported: 8, 4 or None")
        if self.number_format not in NUMBER_FORMATS:
            raise OptionError(f"number_format={self.number_format!r}; valid: {NUMBER_FORMATS}")
        if self.number_format == "fp8" and self.weight_bits != 8:
            raise OptionError(f"FP8 needs weight_bits=8, got {self.weight_bits!r}")
        if self.weight_bits == 4 and not _power_of_two(self.group_size, 16):
            raise OptionError(f"INT4 needs group_size a power of two >= 16 (e.g. 32, 64, 128), got {self.group_size!r}")
        if self.embedding not in EMBEDDING_FORMATS:
            raise OptionError(f"embedding={self.embedding!r}; valid: {EMBEDDING_FORMATS}")

    @property
    def format(self) -> Optional[str]:
        """The weights' format as scheme keys name it: "int8", "fp8", "int4", or None (float)."""
        if self.weight_bits is None:
            return None
        return "int4" if self.weight_bits == 4 else ("fp8" if self.number_format == "fp8" else "int8")


@dataclass(frozen=True)
class Activations:
    """How the inputs of quantized linears are quantized.

    activation: None (weight-only), "dynamic" (per token), "blocks" (per block of 32 input channels
        of a token, INT8 only) or "static" (per tensor, calibrated).
    activation_format: "int8" or "fp8", or None for the weights' own format.
    observer: how a static scale is chosen from calibration data
        (``qcompiler.calibration.observers.OBSERVERS``); percentile: for the "percentile" observer.
    clip: static activation range as a fraction of the observer's range (values beyond it
        saturate), or "auto" for a per-layer search over ``clip_grid`` against the output error on
        the calibration data (jointly with ``alpha="auto"``).
    """

    activation: Optional[str] = "dynamic"
    activation_format: Optional[str] = None
    observer: str = "minmax"
    percentile: float = 99.99
    clip: Union[float, str] = 1.0
    clip_grid: tuple = DEFAULT_CLIP_GRID

    def __post_init__(self):
        from qcompiler.calibration.observers import OBSERVERS

        if self.activation not in ACTIVATION_SCHEMES:
            raise OptionError(f"activation={self.activation!r}; valid: {ACTIVATION_SCHEMES}")
        if self.activation_format not in ACTIVATION_FORMATS:
            raise OptionError(f"activation_format={self.activation_format!r}; valid: {ACTIVATION_FORMATS}")
        if self.observer not in OBSERVERS:
            raise OptionError(f"unknown observer {self.observer!r}; valid: {sorted(OBSERVERS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise OptionError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.clip != "auto" and not (isinstance(self.clip, (int, float)) and 0.0 < self.clip <= 1.0):
            raise OptionError(f"clip must be in (0, 1] or 'auto', got {self.clip!r}")
        if self.clip != 1.0 and self.activation != "static":
            raise OptionError(f"clip applies to static activation scales, but activation={self.activation!r}")
        _set(self, "clip_grid", tuple(float(c) for c in self.clip_grid))


@dataclass(frozen=True)
class Rounding:
    """How INT4 weights are rounded, and the calibration-time algorithms' settings (``qcompiler.algorithms``).

    algorithm: a key of ``ALGORITHMS``: "rtn" (round to nearest), "awq" (activation-aware scales and
        clipping), "gptq" (Hessian-based error feedback), "awq-gptq" (AWQ's scales, GPTQ's rounding).
    awq_grid: AWQ scale-exponent candidates searched per layer group.
    weight_clip, weight_clip_grid: search a clip ratio per (output row, group) against the layer's
        output error before rounding (``clip_search``), over this many ratios from 1 down to 0.5.
    gptq_damp: GPTQ dampening, a fraction of the Hessian's mean diagonal; gptq_block: its lazy-update
        width; act_order: columns by decreasing Hessian diagonal (groups stay static).
    first_token_weight: weight of each calibration sequence's first token (a causal LM's attention
        sink) in the rounding objectives; the GPTQ recipes use 64.
    refit_scales: after the codes are chosen, refit each row's group scales by least squares
        against the layer's output on the calibration data (``scale_refit``).
    tune_epochs, tune_lr: train every INT4 group scale end to end (codes fixed) for this many passes
        over the calibration data with Adam at this initial rate, cosine-decayed (``scale_tuning``).
    What each default bought, measured: docs/experiments.md ("INT4, FP8 and ``auto``").
    """

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

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise OptionError(f"algorithm={self.algorithm!r}; valid: {sorted(ALGORITHMS)}")
        if not self.first_token_weight >= 1.0:
            raise OptionError(f"first_token_weight must be >= 1 (1 = every token alike), got {self.first_token_weight!r}")
        if not 0.0 < self.gptq_damp < 1.0 or self.gptq_block < 1 or self.awq_grid < 1 or self.weight_clip_grid < 1:
            raise OptionError("gptq_damp must be in (0, 1), gptq_block, awq_grid and weight_clip_grid >= 1")
        if not (isinstance(self.tune_epochs, int) and self.tune_epochs >= 0) or not self.tune_lr > 0:
            raise OptionError(f"tune_epochs must be an integer >= 0 and tune_lr > 0, got {self.tune_epochs!r}, "
                              f"{self.tune_lr!r}")


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant's input-channel scales: ``alpha`` in [0, 1] or "auto" (a per-layer search over
    ``alpha_grid``); ``smooth_skip``: module-name patterns whose input gets no SmoothQuant / AWQ scale."""

    smoothquant: bool = False
    alpha: Union[float, str] = 0.5
    alpha_grid: tuple = DEFAULT_ALPHA_GRID
    smooth_skip: tuple = ()

    def __post_init__(self):
        if self.alpha != "auto" and not (isinstance(self.alpha, (int, float)) and 0.0 <= self.alpha <= 1.0):
            raise OptionError(f"alpha must be in [0, 1] or 'auto', got {self.alpha!r}")
        _set(self, "alpha_grid", tuple(float(a) for a in self.alpha_grid))
        _set(self, "smooth_skip", patterns("smooth_skip", self.smooth_skip))


@dataclass(frozen=True)
class Guards:
    """Measured fallbacks: a linear whose output SQNR on the calibration data is below ``min_sqnr_db``,
    or whose static scale loses more than ``max_static_loss_db`` against per-token scales, keeps its
    activations in floating point (None disables a guard)."""

    min_sqnr_db: Optional[float] = 20.0
    max_static_loss_db: Optional[float] = 6.0

    def __post_init__(self):
        for name in ("min_sqnr_db", "max_static_loss_db"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v)):
                raise OptionError(f"{name} must be a number of dB or None, got {v!r}")


@dataclass(frozen=True)
class MixedPrecision:
    """``mixed_precision``: each linear's format chosen from ``auto_formats`` at calibration, the
    model as small as possible within ``budget`` (relative perplexity increase, 0.01 = 1%)."""

    mixed_precision: bool = False
    budget: float = 0.01
    auto_formats: tuple = DEFAULT_AUTO_FORMATS

    def __post_init__(self):
        if not 0.0 < self.budget:
            raise OptionError(f"budget must be > 0 (0.01 = 1% perplexity), got {self.budget!r}")
        _set(self, "auto_formats", tuple(self.auto_formats))


@dataclass(frozen=True)
class Attention:
    """``attention``: None (floating point) or "int8" / "fp8": every scaled_dot_product_attention runs
    as ``qcompile::attention_q8``."""

    attention: Optional[str] = None

    def __post_init__(self):
        if self.attention not in ATTENTION_FORMATS:
            raise OptionError(f"attention={self.attention!r}; valid: {ATTENTION_FORMATS}")


@dataclass(frozen=True)
class KVCache:
    """``kv_cache``: None or a ``qcompiler.QuantizedKVCache`` scheme for ``generate()``;
    ``kv_group_size`` (None: ``DEFAULT_KV_GROUP``), ``kv_residual`` recent tokens kept in float."""

    kv_cache: Optional[str] = None
    kv_group_size: Optional[int] = None
    kv_residual: int = DEFAULT_KV_RESIDUAL

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_FORMATS:
            raise OptionError(f"unknown KV-cache scheme {self.kv_cache!r} (kv_cache={self.kv_cache!r}); valid "
                              f"schemes: {sorted(f for f in KV_CACHE_FORMATS if f)}")
        if self.kv_group_size is not None and not _power_of_two(self.kv_group_size):
            raise OptionError(f"KV-cache group size must be a power of two (e.g. 32 or 64), got {self.kv_group_size!r}")
        if not (isinstance(self.kv_residual, int) and self.kv_residual >= 0):
            raise OptionError(f"KV-cache residual must be a number of tokens >= 0, got {self.kv_residual!r}")

    @property
    def group(self) -> Optional[int]:
        """The group size used: ``kv_group_size``, else the scheme's default."""
        return self.kv_group_size if self.kv_group_size is not None else DEFAULT_KV_GROUP.get(self.kv_cache)


# Recipe attribute -> spec class; every spec field is an option of the same name
SPECS = {"weights": Weights, "activations": Activations, "rounding": Rounding, "smoothing": Smoothing,
         "guards": Guards, "mixed": MixedPrecision, "attn": Attention, "kv": KVCache}
FIELD_SPEC = {f.name: part for part, cls in SPECS.items() for f in dataclasses.fields(cls)}
