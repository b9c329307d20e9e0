"""Recording calibration statistics: forward hooks on every linear layer, a tap on every
attention call, and the helpers that run a model on one calibration batch.

``Recorder`` hooks every linear layer (``nn.Linear`` and GPT-2's ``Conv1D``) and records, for the
layer's input activation, an ``ActivationStats`` (the per-input-channel absolute maximum for
SmoothQuant and min/max scales, a bounded uniform sample of rows for observers, searches and the
SQNR ``explain`` reports). Every ``scaled_dot_product_attention`` call is seen through a
``TorchFunctionMode`` active for the recording only, and its query, key and value go into an
``AttentionStats`` under the name of the innermost module running (static 8-bit attention's
constants). On exit they go into the model's own ``QuantState``. NaN or Inf in an activation is
an error naming the layer.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from qcompiler.calibration.state import linear_layers, state_of, unwrap
from qcompiler.calibration.stats import ActivationStats, AttentionStats
from qcompiler.errors import CalibrationError


class _AttentionTap(TorchFunctionMode):
    """Passes every torch function through; shows each ``scaled_dot_product_attention`` call's
    query, key and value to ``observe``."""

    def __init__(self, observe):
        super().__init__()
        self.observe = observe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.observe(*args[:3], **{k: kwargs[k] for k in ("query", "key", "value") if k in kwargs})
        return func(*args, **kwargs)


class Recorder:
    """Hooks that record every linear's input statistics while the model runs (a context manager)."""

    def __init__(self, model: nn.Module, max_rows: int, progress: bool, allow_empty: bool = False):
        from tqdm.auto import tqdm

        self.allow_empty = allow_empty
        self.model = unwrap(model)
        self.max_rows = max_rows
        self.batches = 0
        self.bar = tqdm(desc="qcompile calibration", unit="batch", disable=not progress, leave=False)
        self.new: dict = {}
        self.attention: dict = {}
        self.modules: list = []  # names of the modules running, innermost last
        self.handles = []
        self.tap = _AttentionTap(self.observe_attention)

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

    def _enter(self, name: str) -> None:
        self.modules.append(name)

    def _leave(self) -> None:  # a forward hook's return value would replace the module's output
        self.modules.pop()

    def observe_attention(self, query=None, key=None, value=None) -> None:
        if not all(isinstance(t, Tensor) and t.dim() == 4 and t.is_floating_point() for t in (query, key, value)):
            return  # a form static attention does not take (the attention pass keeps it in floating point)
        name = self.modules[-1] if self.modules else ""
        for what, t in (("query", query), ("key", key), ("value", value)):
            if not torch.isfinite(t).all():
                raise CalibrationError(
                    f"calibration attention {what} in {name or 'the model'!r} contains NaN or Inf; check the "
                    "calibration batches (and the model in FP32) for non-finite values and calibrate on clean data")
        stats = self.attention.get(name)
        if stats is None or not stats.fits(query, key, value):
            stats = self.attention[name] = AttentionStats.empty(name, query, key, value)
        stats.update(query, key, value)

    def count(self, module, args, output) -> None:
        self.batches += 1
        self.bar.update(1)

    def __enter__(self):
        for name, mod in linear_layers(self.model):
            hook = lambda m, a, _n=name, _w=mod.weight: self.observe(_n, _w, m, a)
            self.handles.append(mod.register_forward_pre_hook(hook))
        self.handles.append(self.model.register_forward_hook(self.count))
        for name, mod in self.model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(lambda m, a, _n=name: self._enter(_n)))
            self.handles.append(mod.register_forward_hook(lambda m, a, o: self._leave(), always_call=True))
        self.tap.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.tap.__exit__(exc_type, exc, tb)
        for h in self.handles:
            h.remove()
        self.bar.close()
        if exc_type is not None:
            return False
        if self.batches == 0 or not self.new:
            if self.allow_empty:
                return False
            raise CalibrationError(
                "calibration saw no data: call the model on representative batches inside "
                "`with qcompiler.calibrate(model): ...` (no linear layer received an input)")
        state_of(self.model).update(stats=self.new, attention=self.attention)
        return False


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model`` (and every submodule) in ``eval()`` for the block; each module's mode restored after."""
    modes = [(m, m.training) for m in unwrap(model).modules()]
    unwrap(model).eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def call_model(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def call_model_with(model, params: dict, batch):
    """``call_model`` with some of the model's tensors replaced (name -> tensor) for this call."""
    if isinstance(batch, dict):
        return torch.func.functional_call(model, params, (), batch, strict=False)
    args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    return torch.func.functional_call(model, params, args, strict=False)
