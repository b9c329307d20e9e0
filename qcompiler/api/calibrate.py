"""Calibration: record the activation statistics that the recipes need, per linear layer.

``with qcompiler.calibrate(model): model(batch) ...`` hooks every ``nn.Linear`` of the model and
records, for the layer's input activation: the per-input-channel absolute maximum (SmoothQuant,
min/max scales) and a bounded random sample of rows (percentile/MSE observers, the alpha search,
the SQNR that ``explain`` reports). Statistics go into the model's own ``QuantState``
(``qcompiler.calibration.state``), whose link on each weight ``Parameter`` is how a later ``torch.compile``
finds them (Dynamo hands the backend parameters, not the model). The model runs in ``eval()``
mode while calibrating (dropout would skew the statistics); its mode is restored after. Calibrating an already compiled model runs it eagerly for the duration and makes
its compiled graphs rebuild with the new statistics on their next call.

Recipes whose weights come from an algorithm (AWQ, GPTQ, ``auto``) are prepared here too:
``qcompiler.calibrate(model, data, recipe="w4a16-gptq")`` runs the algorithm block by block over
``data`` and keeps one ``PreparedWeight`` per linear in the same state.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from qcompiler.algorithms import auto, rounding
from qcompiler.api.options import check_compile, split_options
from qcompiler.calibration.blockwise import materialize
from qcompiler.calibration.recorder import Recorder, call_model, eval_mode
from qcompiler.calibration.state import unwrap
from qcompiler.calibration.stats import DEFAULT_ROWS
from qcompiler.errors import CalibrationError


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
        self._session = Recorder(self.model, self.max_rows, self.progress, allow_empty=self.ran).__enter__()
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
        if resolved.rounds_weights:
            if data is None:
                raise CalibrationError(
                    f"recipe {resolved.name!r} runs its weight-rounding algorithm over calibration data "
                    f"block by block: pass the batches, `qcompiler.calibrate(model, batches, recipe=...)`")
            data = materialize(data)
            # the auto recipe chooses a format per linear; the others round with their algorithm
            prepare = auto.choose if resolved.mixed_precision else rounding.prepare
            with torch.compiler.set_stance("force_eager"), eval_mode(model):
                prepare(unwrap(model), data, resolved, loss_fn=loss_fn, max_rows=max_rows, progress=progress)
            session.ran = True  # the block-wise run recorded the statistics too
            return session
    if data is not None:
        session.run(data)
    return session
