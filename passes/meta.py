"""Frozen records the passes leave in ``node.meta[META_KEY]``; ``explain`` reads them back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor

META_KEY = "qcompile"
FLOATING_POINT = "floating point"


def node_value(node):
    """The (fake) value a node produces: Dynamo records ``example_value``, ``torch.export`` ``val``."""
    meta = getattr(node, "meta", None) or {}
    return meta.get("example_value", meta.get("val"))


@dataclass(frozen=True)
class LinearMatch:
    """A linear op whose weight is a model parameter (set by ``match``)."""

    module: str                       # owning module's qualified name
    pattern: str                      # which pattern matched (F.linear, addmm, matmul, ...)
    x: object                         # the activation fx.Node when matched (see match.activation_of)
    weight: Tensor = field(repr=False, compare=False)        # [N, K] as F.linear takes it
    param: Tensor = field(repr=False, compare=False)         # the Parameter itself (identity key)
    bias: object = None                                      # fx.Node, or None
    recipe: object = None             # Recipe, or None for floating point
    reason: str = ""


@dataclass(frozen=True)
class ActivationPlan:
    """How one linear's input is prepared for quantization (set by ``smooth``).

    SmoothQuant: x / s feeds the layer and W * s replaces W (``scale`` is s, else None).
    ``clip`` scales the observer's static activation range (1.0: the observer's own range).
    """

    scale: Optional[Tensor] = field(default=None, repr=False, compare=False)  # s, [K]
    alpha: Optional[float] = None
    folded_into: Optional[str] = None  # producer that absorbed 1/s, or None: applied in quantize
    folded_params: tuple = ()          # qualified names of the producer's parameters divided by s
    clip: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What happened to one linear or attention op; one row of ``explain``'s report (made by keyword)."""

    module: str
    op: str                           # "linear" | "attention" | "matmul"
    scheme: str                       # recipe name or FLOATING_POINT
    reason: str
    sqnr_db: Optional[float] = None   # output SQNR vs FP32 on the calibration rows
    alpha: Optional[float] = None
    clip: Optional[float] = None      # static activation range / observer's range
    smoothing: Optional[str] = None
    weight_bytes_fp32: int = 0
    weight_bytes_quantized: int = 0
    param_id: Optional[int] = field(default=None, compare=False)
    # static activation recipes: how much per-token SQNR (every token weighted alike) the static
    # scale loses against per-token (dynamic) scales on the same rows and weights
    static_loss_db: Optional[float] = None
    fallback: Optional[str] = None    # the guard that kept its activations in FP (a FALLBACKS key)
    weight_only: bool = False         # the guard's fallback kept the weights 8-bit (activations in FP)


# the guards that keep a linear's activations (weight-only INT8) or the whole linear in floating
# point after measuring it: the recipe field, what it means
FALLBACKS = {
    "min_sqnr_db": "its output SQNR on the calibration data is below min_sqnr_db",
    "max_static_loss_db": "its static activation scale loses more than max_static_loss_db against per-token "
                          "scales (the dynamic recipe 'w8a8' quantizes it)",
    "nan": "its quantized output on the calibration data is NaN",
}
