"""Observers: turn calibration statistics into a static per-tensor activation range.

Each observer is a function ``(stats, smooth_inv, recipe) -> amax`` registered by name; the
range it returns becomes the scale ``amax / qmax`` (127 for INT8, 448 for FP8) of the static recipes. ``stats`` is the
``ActivationStats`` that calibration recorded for the layer's input; ``smooth_inv`` is the
SmoothQuant reciprocal scale the layer's activations are multiplied by before quantizing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:  # no torch import at module load: the recipe table (and the CLI) reads the names
    from torch import Tensor

OBSERVERS: dict[str, Callable] = {}


def register_observer(name: str):
    def deco(fn):
        OBSERVERS[name] = fn
        return fn
    return deco


def static_scale(stats, smooth_inv: Optional[Tensor], recipe, clip: float = 1.0) -> Tensor:
    """The static per-tensor INT8 scale: the recipe's observer range times ``clip``, over 127."""
    from qcompiler.ir.ops import scale_from_amax

    return scale_from_amax(OBSERVERS[recipe.observer](stats, smooth_inv, recipe) * clip, recipe.qdtype)


def _smoothed_rows(stats, smooth_inv: Optional[Tensor]) -> Tensor:
    rows = stats.rows
    return rows if smooth_inv is None else rows * smooth_inv


@register_observer("minmax")
def minmax(stats, smooth_inv, recipe) -> Tensor:
    """The largest absolute value seen, over every calibration token (not only the kept rows).

    Exact under smoothing too: max_j |X_j| / s_j = max over tokens and channels of |X / s|.
    """
    amax = stats.channel_absmax if smooth_inv is None else stats.channel_absmax * smooth_inv
    return amax.max()


@register_observer("percentile")
def percentile(stats, smooth_inv, recipe) -> Tensor:
    """The ``recipe.percentile``-th percentile of |x| over the kept calibration rows."""
    values = _smoothed_rows(stats, smooth_inv).abs().flatten()
    k = max(1, min(values.numel(), int(round(values.numel() * recipe.percentile / 100.0))))
    return values.kthvalue(k).values


@register_observer("mse")
def mse(stats, smooth_inv, recipe) -> Tensor:
    """The clipping range (a fraction of the max) that minimises the INT8 round-trip MSE."""
    from qcompiler.ir.ops import quantize_per_tensor_ref, scale_from_amax

    rows = _smoothed_rows(stats, smooth_inv)
    full = minmax(stats, smooth_inv, recipe)
    best, best_err = full, float("inf")
    for frac in (0.3 + 0.02 * i for i in range(36)):  # 0.3 ... 1.0
        scale = scale_from_amax(full * frac, recipe.qdtype)
        err = (quantize_per_tensor_ref(rows, scale, None, recipe.qdtype).float() * scale - rows).pow(2).mean().item()
        if err < best_err:
            best, best_err = full * frac, err
    return best
