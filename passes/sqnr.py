"""Signal-to-quantization-noise ratios: how the passes, the guards and the tests measure error."""
from __future__ import annotations

import math

from torch import Tensor

SQNR_ROWS = 256  # rows a layer is measured on: enough for a stable dB figure, few enough to compile fast


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); +inf when exact, NaN never passes silently."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if math.isnan(noise) or math.isnan(signal):
        return float("nan")
    return float("inf") if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)


def token_sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """SQNR with every row (token) weighted alike: -10 log10 of the mean over rows of
    |ref_r - approx_r|^2 / |ref_r|^2. Unlike ``sqnr_db`` it does not let a few large tokens hide
    what happens to the others (the next LayerNorm gives every token the same weight)."""
    ref, approx = ref.double().flatten(0, -2), approx.double().flatten(0, -2)
    rel = (ref - approx).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-300)
    mean = rel.mean().item()
    if math.isnan(mean):
        return float("nan")
    return float("inf") if mean == 0 else -10 * math.log10(mean)
