"""Calibration: record the activation statistics that the recipes need, per linear layer.

``with qcompiler.calibrate(model): model(batch) ...`` hooks every ``nn.Linear`` of the model and
records, for the layer's input activation: the per-input-channel absolute maximum (SmoothQuant,
min/max scales) and a bounded random sample of rows (percentile/MSE observers, the alpha search,
the SQNR that ``explain`` reports). Statistics go into the model's own ``QuantState``
(``qcompiler.state``), whose link on each weight ``Parameter`` is how a later ``torch.compile``
finds them (Dynamo hands the backend parameters, not the model). The model runs in ``eval()``
mode while calibrating (dropout would skew the statistics); its mode is restored after. Calibrating an already compiled model runs it eagerly for the duration and makes
its compiled graphs rebuild with the new statistics on their next call.

Recipes whose weights come from an algorithm (AWQ, GPTQ, ``auto``) are prepared here too:
``qcompiler.calibrate(model, data, recipe="w4a16-gptq")`` runs the algorithm block by block over
``data`` and keeps one ``PreparedWeight`` per linear in the same state.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from qcompiler.errors import CalibrationError  # noqa: F401  (raised here, re-exported)
from qcompiler.options import check_compile, split_options
from qcompiler.state import linear_layers, prepared_for, state_of, stats_for, unwrap  # noqa: F401  (re-exported)

DEFAULT_ROWS = 1024


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


@dataclass(frozen=True)
class PreparedWeight:
    """A linear's weight as a calibration-time algorithm left it for the quantize pass.

    ``recipe`` is what the layer gets (None: floating point, with ``reason``); ``weight`` the
    rounded weight in its packed form (None when the quantize pass rounds it itself);
    ``smooth_scale`` the per-input-channel scale s that the weight absorbed (AWQ), so the
    layer's input must be divided by it; ``key`` the recipe fields the weight was made for.
    """

    recipe: object
    key: tuple
    weight: object = None
    smooth_scale: Optional[Tensor] = None
    reason: str = ""
    sensitivity: dict = field(default_factory=dict)    # format -> relative output error


def store_prepared(model: nn.Module, prepared: dict, stats: Optional[dict] = None,
                   last_run: Optional[dict] = None) -> None:
    """Keep prepared weights (and the activation statistics the same run recorded) in the
    model's quantization state; keys are the model's linear weights."""
    state_of(model).update(stats=stats, prepared=prepared, last_run=last_run)


def forget(model: nn.Module) -> None:
    """Drop the calibration statistics and prepared weights of ``model`` (compiled graphs rebuild)."""
    state_of(model).clear()


class _Session:
    def __init__(self, model: nn.Module, max_rows: int, progress: bool, allow_empty: bool = False):
        from tqdm.auto import tqdm

        self.allow_empty = allow_empty
        self.model = unwrap(model)
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
        for name, mod in linear_layers(self.model):
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
            if self.allow_empty:
                return False
            raise CalibrationError(
                "calibration saw no data: call the model on representative batches inside "
                "`with qcompiler.calibrate(model): ...` (no linear layer received an input)")
        state_of(self.model).update(stats=self.new)
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


class Calibration:
    """A calibration session (what ``calibrate`` returns); a context manager for calling the
    model yourself."""

    def __init__(self, model: nn.Module, max_rows: int, progress: bool):
        self.model, self.max_rows, self.progress = model, max_rows, progress
        self._session = None
        self._stance = None
        self.ran = False  # batches were given to calibrate(): a with-block after it may add none

    def run(self, data: Iterable) -> None:
        with self:
            for batch in data:
                call_model(self.model, batch)
        self.ran = True

    def __enter__(self):
        self._session = _Session(self.model, self.max_rows, self.progress, allow_empty=self.ran).__enter__()
        self._stance = contextlib.ExitStack()
        self._stance.enter_context(torch.compiler.set_stance("force_eager"))
        self._stance.enter_context(torch.no_grad())
        self._stance.enter_context(eval_mode(self.model))
        return self

    def __exit__(self, exc_type, exc, tb):
        self._stance.close()
        return self._session.__exit__(exc_type, exc, tb)


def calibrate(model: nn.Module, data: Optional[Iterable] = None, *, recipe=None, loss_fn=None,
              max_rows: int = DEFAULT_ROWS, progress: bool = True) -> Calibration:
    """Record activation statistics of ``model``'s linear layers (and prepare algorithm weights).

    Args:
        model: an ``nn.Module`` or the result of ``torch.compile`` on one (it runs eagerly while
            calibrating; its compiled graphs rebuild with the statistics on the next call).
        data: batches to run now (a tensor, a tuple of positional arguments, or a dict of
            keyword arguments each). Without it, call the model yourself inside
            ``with qcompiler.calibrate(model): ...``.
        recipe: a recipe name / ``Recipe`` / options dict whose weights come from an algorithm
            run on ``data`` here, block by block: ``"w4a16-awq"``, ``"w4a16-gptq"``, ``"auto"``.
            Other recipes need only the statistics and can leave it out.
        loss_fn: for ``recipe="auto"``: ``loss_fn(model_output, batch) -> scalar`` (mean
            negative log-likelihood); default: next-token cross-entropy of a causal language
            model's logits on the batch's ``input_ids``.
        max_rows: activation rows kept per layer (a uniform sample) for observers and searches.
        progress: show progress bars.

    Examples:
        >>> qcompiler.calibrate(model, batches)                        # statistics only
        >>> qcompiler.calibrate(model, batches, recipe="w4a16-gptq")   # + GPTQ weights
        >>> fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq"})
        >>> with qcompiler.calibrate(fast):      # or call a (compiled) model yourself
        ...     for batch in batches:
        ...         fast(batch)
    """
    check_compile(model)  # a compiled model's options: wrong ones fail now, not after calibrating
    resolved = None
    if recipe is not None:
        resolved, _ = split_options(recipe if isinstance(recipe, Mapping) else {"recipe": recipe})
    session = Calibration(model, max_rows, progress)
    if resolved is not None:
        from qcompiler import weight_rounding

        if resolved.rounds_weights:
            if data is None:
                raise CalibrationError(
                    f"recipe {resolved.name!r} runs its weight-rounding algorithm over calibration data "
                    f"block by block: pass the batches, `qcompiler.calibrate(model, batches, recipe=...)`")
            from qcompiler.blockwise import materialize

            data = materialize(data)
            with torch.compiler.set_stance("force_eager"), eval_mode(model):
                weight_rounding.prepare(unwrap(model), data, resolved, loss_fn=loss_fn,
                                        max_rows=max_rows, progress=progress)
            session.ran = True  # the block-wise run recorded the statistics too
            return session
    if data is not None:
        session.run(data)
    return session


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
