"""Calibration: record the activation statistics that the recipes need, per linear layer.

``with qcompiler.calibrate(model): model(batch) ...`` hooks every ``nn.Linear`` of the model and
records, for the layer's input activation: the per-input-channel absolute maximum (SmoothQuant,
min/max scales) and a bounded random sample of rows (percentile/MSE observers, the alpha search,
the SQNR that ``explain`` reports). Statistics are keyed by the layer's weight ``Parameter``, which
is exactly what Dynamo hands the backend, so a later ``torch.compile`` finds them without needing
the model object. Calibrating an already compiled model runs it eagerly for the duration and makes
its compiled graphs rebuild with the new statistics on their next call.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

DEFAULT_ROWS = 1024


class CalibrationError(ValueError):
    """Calibration data or calibration state that the compiler cannot use."""


@dataclass
class ActivationStats:
    """What calibration saw at one linear layer's input."""

    module: str
    channel_absmax: Tensor                 # [K] float32, over every calibration token
    rows: Tensor                           # [<=max_rows, K] float32, a uniform sample of tokens
    tokens: int = 0
    max_rows: int = DEFAULT_ROWS
    _gen: torch.Generator = field(default=None, repr=False)
    # results of searches over these statistics (e.g. SmoothQuant alpha), so recompiles for
    # new shapes or grad modes do not search again; a new calibration brings new statistics
    searches: dict = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, module: str, k: int, max_rows: int) -> "ActivationStats":
        gen = torch.Generator().manual_seed(0)
        return cls(module, torch.zeros(k), torch.empty(0, k), 0, max_rows, gen)

    def to(self, device) -> "ActivationStats":
        """The same statistics with their tensors on ``device`` (searches stay shared)."""
        return dataclasses.replace(self, channel_absmax=self.channel_absmax.to(device), rows=self.rows.to(device),
                                   searches=self.searches)

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        self.channel_absmax = torch.maximum(self.channel_absmax, x.abs().amax(dim=0))
        # reservoir sampling: every token seen so far is kept with equal probability
        n = x.shape[0]
        take = max(0, min(n, self.max_rows - self.rows.shape[0]))
        if take:
            self.rows = torch.cat([self.rows, x[:take]])
        if take < n:
            seen = self.tokens + take + torch.arange(n - take)
            slot = (torch.rand(n - take, generator=self._gen) * (seen + 1)).long()
            keep = slot < self.max_rows
            self.rows[slot[keep]] = x[take:][keep]
        self.tokens += n


# weight Parameter -> ActivationStats of that layer's input
_STATS: WeakIdKeyDictionary = WeakIdKeyDictionary()
# bumped whenever a calibration ends; compiled graphs rebuild when it moved
_generation = [0]


def stats_for(weight: Tensor) -> Optional[ActivationStats]:
    return _STATS.get(weight)


def forget(model: nn.Module) -> None:
    """Drop the calibration statistics of ``model``'s parameters (compiled graphs rebuild)."""
    for p in _unwrap(model).parameters():
        _STATS.pop(p, None)
    _generation[0] += 1


def generation() -> int:
    return _generation[0]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


class _Session:
    def __init__(self, model: nn.Module, max_rows: int, progress: bool):
        from tqdm.auto import tqdm

        self.model = _unwrap(model)
        self.max_rows = max_rows
        self.batches = 0
        self.bar = tqdm(desc="qcompile calibration", unit="batch", disable=not progress, leave=False)
        self.new: dict = {}
        self.handles = []

    def observe(self, name: str, weight: Tensor, module, args) -> None:
        x = args[0]
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"calibration activation at the input of {name!r} contains NaN or Inf; "
                "check the calibration batches (and the model in FP32) for non-finite values "
                "and calibrate on clean data")
        stats = self.new.get(weight)
        if stats is None:
            stats = self.new[weight] = ActivationStats.empty(name, x.shape[-1], self.max_rows)
        stats.update(x)

    def count(self, module, args, output) -> None:
        self.batches += 1
        self.bar.update(1)

    def __enter__(self):
        for name, mod in self.model.named_modules():
            if isinstance(mod, nn.Linear):
                hook = lambda m, a, _n=name, _w=mod.weight: self.observe(_n, _w, m, a)
                self.handles.append(mod.register_forward_pre_hook(hook))
        self.handles.append(self.model.register_forward_hook(self.count))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self.handles:
            h.remove()
        self.bar.close()
        if exc_type is not None:
            return False
        if self.batches == 0 or not self.new:
            raise CalibrationError(
                "calibration saw no data: call the model on representative batches inside "
                "`with qcompiler.calibrate(model): ...` (no linear layer received an input)")
        for weight, stats in self.new.items():
            _STATS[weight] = stats
        _generation[0] += 1
        return False


@contextlib.contextmanager
def calibrate(model: nn.Module, data: Optional[Iterable] = None, *, max_rows: int = DEFAULT_ROWS,
              progress: bool = True):
    """Record activation statistics of ``model``'s linear layers for the static / SmoothQuant recipes.

    Args:
        model: an ``nn.Module`` or the result of ``torch.compile`` on one (it runs eagerly while
            calibrating; its compiled graphs rebuild with the statistics on the next call).
        data: optional iterable of batches to run here (a tensor, a tuple of positional
            arguments, or a dict of keyword arguments each); otherwise call the model yourself
            inside the ``with`` block.
        max_rows: activation rows kept per layer (a uniform sample) for observers and searches.
        progress: show a progress bar.

    Example:
        >>> fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothquant"})
        >>> with qcompiler.calibrate(fast):
        ...     for batch in batches:
        ...         fast(batch)
        >>> fast(x)   # compiles with the calibrated scales
    """
    session = _Session(model, max_rows, progress)
    with session, torch.compiler.set_stance("force_eager"), torch.no_grad():
        if data is not None:
            for batch in data:
                _call(model, batch)
        yield session


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
