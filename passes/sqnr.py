"""Signal-to-quantization-noise ratios: how the passes, the guards and the tests measure error."""
from __future__ import annotations

import math

from torch import Tensor

SQNR_ROWS = 256  # rows a layer is measured on: enough for a stable dB figure, few enough to compile fast


SUM_CHUNK = 1 << 20  # elements summed at a time: float64 copies of a whole embedding table are GBs


def _sums(ref: Tensor, approx: Tensor) -> tuple:
    """(|ref - approx|^2, |ref|^2) in float64, a chunk of ``SUM_CHUNK`` elements at a time where
    the two have one shape (a weight-sized pair never has a whole float64 copy)."""
    if ref.shape != approx.shape:
        ref, approx = ref.double(), approx.double()
        return (ref - approx).pow(2).sum().item(), ref.pow(2).sum().item()
    ref, approx = ref.reshape(-1), approx.reshape(-1)
    noise = signal = 0.0
    for i in range(0, max(ref.numel(), 1), SUM_CHUNK):
        r, a = ref[i:i + SUM_CHUNK].double(), approx[i:i + SUM_CHUNK].double()
        noise += (r - a).pow(2).sum().item()
        signal += r.pow(2).sum().item()
    return noise, signal


def sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """10 log10(|ref|^2 / |ref - approx|^2); +inf when exact, NaN never passes silently."""
    noise, signal = _sums(ref, approx)
    return _db(noise / max(signal, 1e-300))


def token_sqnr_db(ref: Tensor, approx: Tensor) -> float:
    """SQNR with every row (token) weighted alike: -10 log10 of the mean over rows of
    |ref_r - approx_r|^2 / |ref_r|^2. Unlike ``sqnr_db`` it does not let a few large tokens hide
    what happens to the others (the next LayerNorm gives every token the same weight)."""
    ref, approx = ref.double().flatten(0, -2), approx.double().flatten(0, -2)
    rel = (ref - approx).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(1e-300)
    return _db(rel.mean().item())


def _db(noise_to_signal: float) -> float:
    """-10 log10 of a noise-to-signal ratio: +inf when exact, NaN as NaN."""
    if math.isnan(noise_to_signal):
        return float("nan")
    return float("inf") if noise_to_signal == 0 else -10 * math.log10(noise_to_signal)


class ErrorSums:
    """``sqnr_db`` and ``token_sqnr_db`` of a pair given a block of output columns at a time
    (``add``), without the whole pair in memory: squared errors and squares summed per row."""

    def __init__(self):
        self.noise = self.signal = None  # float64 [rows]

    def add(self, ref: Tensor, approx: Tensor) -> None:
        ref, approx = ref.double().flatten(0, -2), approx.double().flatten(0, -2)
        noise, signal = (ref - approx).pow(2).sum(-1), ref.pow(2).sum(-1)
        self.noise = noise if self.noise is None else self.noise + noise
        self.signal = signal if self.signal is None else self.signal + signal

    def sqnr_db(self) -> float:
        return _db(self.noise.sum().item() / max(self.signal.sum().item(), 1e-300))

    def token_sqnr_db(self) -> float:
        return _db((self.noise / self.signal.clamp_min(1e-300)).mean().item())
