"""The ``auto`` recipe: a format per linear, as small as possible within a perplexity budget.

``qcompiler.calibrate(model, batches, recipe="auto")`` runs here:

1. block by block (``qcompiler.calibration.blockwise``, floating-point inputs: the assignment is not known
   yet) every linear is rounded in every candidate format of ``recipe.auto_formats`` and its
   *sensitivity* measured: the relative output error ``||Y^ - Y||^2 / ||Y||^2`` on its
   calibration rows (INT4 candidates get their algorithm, e.g. GPTQ, here);
2. two searches, each a binary search over a threshold t on those errors for the largest t whose
   *measured* model loss on held-out calibration batches (the last quarter) fits the budget,
   ``exp(mean increase + MARGIN_SE standard errors) <= 1 + budget``: first for size, each linear
   taking the smallest size class (INT4, then 8 bits) whose most accurate format has error <= t,
   else floating point; then for speed, with the sizes fixed, each linear taking the first
   listed (faster) format of its class whose error is <= t (``w8a8`` before ``w8a16``). One
   threshold over all formats chose no INT4 layer on SmolLM2-135M: every 8-bit error there sits
   far below every INT4 error, so a t that admitted INT4 had already spent the budget on
   activation quantization;
3. each linear's choice is stored as a ``PreparedWeight`` (the recipe and, for INT4, the weight),
   which ``match`` reads when the backend compiles with ``recipe="auto"``; ``explain`` shows the
   choice and its reason.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn

from qcompiler.algorithms.rounding import round_block, tied_weights
from qcompiler.calibration import blockwise
from qcompiler.calibration.recorder import call_model_with
from qcompiler.calibration.state import is_linear, linear_weight, store_prepared, stored_weight
from qcompiler.calibration.stats import PreparedWeight
from qcompiler.errors import CalibrationError, OptionError
from qcompiler.ir import int4, ops
from qcompiler.recipes import FLOAT, get_recipe
from qcompiler.schemes.per_block_8bit import ACT_BLOCK

SENSITIVITY_ROWS = 512
# The budget is checked on a few held-out batches, so their mean loss increase is an estimate: a
# choice must fit the budget with its increase raised by this many standard errors of the
# per-batch increases. Without it (0) SmolLM2-135M's choice sat at x1.0199 on its held-out
# calibration windows and at +2.05% on the test windows for a 2% budget (benchmarks/accuracy.py).
MARGIN_SE = 1.0


def causal_lm_loss(output, batch) -> Tensor:
    """Mean next-token cross-entropy of a causal LM's logits on the batch's ``input_ids``."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else (batch[0] if isinstance(batch, (tuple, list)) else batch)
    logits = getattr(output, "logits", output)
    if not (isinstance(ids, Tensor) and not ids.is_floating_point() and isinstance(logits, Tensor)
            and logits.dim() == 3 and logits.shape[:2] == ids.shape):
        raise CalibrationError(
            "recipe 'auto' measures the model's loss on held-out calibration batches; the default loss is "
            "a causal LM's next-token cross-entropy (batches of input_ids, output logits [B, T, V]), which "
            "does not fit this model: pass `loss_fn=lambda output, batch: <scalar loss>` to calibrate()")
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


def _fake_quant_tokens(x: Tensor, qdtype) -> Tensor:
    q, s = ops.quantize_per_token_ref(x, None, qdtype)
    return (q.to(torch.float32) * s).to(x.dtype)


def _fake_quant_blocks(x: Tensor, qdtype) -> Tensor:
    q, s = ops.quantize_per_block_ref(x, ACT_BLOCK, None, qdtype)
    return ops.dequantize_blocks(q, s, ACT_BLOCK).to(x.dtype)


# a recipe's run-time activation quantization, as the sensitivity search simulates it
_ACT_FAKE_QUANT = {"dynamic": _fake_quant_tokens, "blocks": _fake_quant_blocks}


class _Candidate:
    """One linear in one format: its effective float weight on demand, and its sensitivity."""

    def __init__(self, recipe, weight: Tensor, prepared=None):
        self.recipe, self.prepared = recipe, prepared
        self._w8 = None if prepared is not None else ops.quantize_per_channel_ref(weight, recipe.qdtype)
        self.error = float("nan")

    @property
    def act_quant(self):
        """The activation's fake quantization (x, qdtype) -> x, or None (weight-only)."""
        return _ACT_FAKE_QUANT.get(self.recipe.activation)

    def weight(self) -> Tensor:
        if self.prepared is not None:
            return self.prepared.weight.dequantize()
        q, s = self._w8
        return q.to(torch.float32) * s[:, None]

    @property
    def nbytes(self) -> int:
        if self.prepared is not None:
            return self.prepared.weight.nbytes
        q, s = self._w8
        return q.numel() * q.element_size() + s.numel() * 4


def _formats(recipe) -> list:
    out = []
    for name in recipe.auto_formats:
        if name == FLOAT:
            out.append(None)
            continue
        r = get_recipe(name)
        if r.mixed_precision or r.smoothquant or r.awq_scales or \
                r.activation == "static":
            raise OptionError(f"auto_formats: {name!r} cannot be mixed per layer (it needs scales shared by a "
                              f"group of layers or static activation ranges); use e.g. w4a16-gptq, w4a16, "
                              f"w8a8, w8a16, fp8 or 'fp'")
        out.append(r)
    return out


def _rounded(li, r, weight) -> _Candidate:
    if r.weight_bits == 4:
        if not r.calibrated_rounding:
            packed = int4.quantize(weight, r.group_size, r.symmetric)
            return _Candidate(r, weight, PreparedWeight(r, r.prepared_key, packed))
        prepared, _ = round_block([li], lambda _li: r)[li.module]
        return _Candidate(r, weight, prepared)
    return _Candidate(r, weight)


def _sensitivity(c: _Candidate, x: Tensor, w: Tensor) -> float:
    y = x @ w.t()
    x_hat = c.act_quant(x, c.recipe.qdtype) if c.act_quant else x
    return ((x_hat @ c.weight().t() - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)).item()


def choose(model: nn.Module, batches: list, recipe, *, loss_fn=None, max_rows: int = 1024,
           progress: bool = True) -> dict:
    if len(batches) < 2:
        raise CalibrationError("recipe 'auto' needs at least 2 calibration batches: the last quarter is held "
                               "out to measure the model's loss against the budget")
    formats = [f for f in _formats(recipe)]
    held = batches[-max(1, len(batches) // 4):]
    fit = batches[:len(batches) - len(held)]
    loss_fn = loss_fn or causal_lm_loss
    tied = set() if recipe.quantize_tied else tied_weights(model)
    start = time.perf_counter()
    layers = {}   # module -> (name, {format index: _Candidate})

    def handle(block_name, linears):
        for li in linears:
            if li.module in layers or id(li.module.weight) in tied or recipe.for_module(li.name) is None:
                continue
            w = linear_weight(li.module).detach().to(torch.float32)
            x = li.inputs.rows.rows[:SENSITIVITY_ROWS]
            cands = {}
            for i, r in enumerate(formats):
                if r is not None:
                    cands[i] = _rounded(li, r, w)
                    cands[i].error = _sensitivity(cands[i], x, w)
            layers[li.module] = (li.name, cands)
        return {}  # floating-point inputs for the next block

    need_h = any(r is not None and r.calibrated_rounding for r in formats)
    ignore = {m for n, m in model.named_modules() if is_linear(m)
              and (id(m.weight) in tied or recipe.for_module(n) is None)}
    stats = blockwise.run(model, fit, handle, need_hessian=need_h, max_rows=max_rows, progress=progress,
                          on_outside=lambda linears: handle("", linears), ignore=ignore)
    names = {mod: name for mod, (name, _) in layers.items()}

    def loss(assignment: dict) -> Tensor:
        """The loss on each held-out batch (float64 [len(held)])."""
        params, hooks = {}, []
        for mod, i in assignment.items():
            if i is None:
                continue
            c = layers[mod][1][i]
            params[f"{names[mod]}.weight"] = stored_weight(mod, c.weight()).to(mod.weight.dtype)
            if c.act_quant:
                hooks.append(mod.register_forward_pre_hook(
                    lambda m, a, _q=c.recipe.qdtype, _f=c.act_quant: (_f(a[0], _q), *a[1:])))
        losses = []
        try:
            with torch.no_grad():
                for batch in held:
                    losses.append(float(loss_fn(call_model_with(model, params, batch), batch)))
        finally:
            for h in hooks:
                h.remove()
        return torch.tensor(losses, dtype=torch.float64)

    base_losses = loss({})

    def within(losses: Tensor) -> bool:
        # the budget holds for the mean paired loss increase plus MARGIN_SE standard errors of it
        d = losses - base_losses
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
        return math.exp(float(d.mean()) + MARGIN_SE * se) - 1 <= recipe.budget

    errors = {mod: {i: (c.recipe.weight_bits, c.error) for i, c in cands.items()} for mod, (_, cands) in layers.items()}
    best, best_losses, evals = search(errors, loss, within)
    best_loss = float((base_losses if best_losses is None else best_losses).mean())
    base = float(base_losses.mean())
    # the held-out estimate of the perplexity increase and its standard error (paired per batch)
    diff = (base_losses if best_losses is None else best_losses) - base_losses
    diff_se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    evals += 1

    prepared = {}
    for mod, (name, cands) in layers.items():
        i = best[mod]
        errs = {(formats[j].name if formats[j] else FLOAT): c.error for j, c in cands.items()}
        summary = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        if i is None:
            prepared[mod.weight] = PreparedWeight(None, (), reason=f"auto: too sensitive (output error {summary})",
                                                  sensitivity=errs)
            continue
        c = cands[i]
        p = c.prepared
        prepared[mod.weight] = PreparedWeight(c.recipe, p.key if p else (), p.weight if p else None,
                                              reason=f"auto: output error {summary}", sensitivity=errs)
    for mod in ignore:  # tied or skipped: floating point, and compiling says why
        prepared[mod.weight] = PreparedWeight(None, (), reason="auto: not a candidate (weight tied to a "
                                              "non-linear use, or kept by a skip/override pattern)")
    store_prepared(model, prepared, stats, last_run=dict(
        algorithm="auto", layers=len(prepared), evaluations=evals, seconds=time.perf_counter() - start,
        loss_fp=base, loss_auto=best_loss, ppl_ratio=math.exp(best_loss - base),
        held_out_batches=len(held), ppl_increase=math.exp(float(diff.mean())) - 1,
        ppl_increase_se=math.exp(float(diff.mean())) * diff_se, budget=recipe.budget, margin_se=MARGIN_SE,
        formats={(formats[i].name if i is not None and formats[i] else FLOAT):
                 sum(1 for v in best.values() if v == i) for i in set(best.values())}))
    return prepared


def search(errors: dict, loss: Callable[[dict], object], within: Callable[[object], bool]) -> tuple:
    """(assignment {layer: format index or None}, its loss or None, loss evaluations).

    ``errors[layer][i] = (size class, error)`` for each candidate format ``i`` (indices in the
    user's order: faster first within a size class). ``loss(assignment)`` measures a model;
    ``within(loss)`` is the budget. Size first, then speed (module docstring, step 2).
    """
    evals = 0

    def largest_within(assign_at, thresholds, start):
        nonlocal evals
        lo, hi, best, best_loss = 0, len(thresholds) - 1, start, None
        while lo <= hi:
            mid = (lo + hi) // 2
            a = assign_at(thresholds[mid])
            evals += 1
            l_mid = loss(a)
            if within(l_mid):
                best, best_loss, lo = a, l_mid, mid + 1
            else:
                hi = mid - 1
        return best, best_loss

    accurate = {}  # layer -> {size class: its most accurate format}
    for layer, cands in errors.items():
        accurate[layer] = {}
        for i, (bits, err) in cands.items():
            if bits not in accurate[layer] or err < cands[accurate[layer][bits]][1]:
                accurate[layer][bits] = i

    def by_size(t: float) -> dict:
        return {layer: next((accurate[layer][b] for b in sorted(accurate[layer])
                             if errors[layer][accurate[layer][b]][1] <= t), None) for layer in errors}

    every = sorted({err for cands in errors.values() for _, err in cands.values()})
    sized, size_loss = largest_within(by_size, every, {layer: None for layer in errors})

    def by_speed(t: float) -> dict:
        return {layer: i if i is None else next(
            j for j, (bits, err) in sorted(errors[layer].items())
            if bits == errors[layer][i][0] and (j == i or err <= t)) for layer, i in sized.items()}

    faster = sorted({err for layer, i in sized.items() if i is not None
                     for j, (bits, err) in errors[layer].items() if j < i and bits == errors[layer][i][0]})
    best, speed_loss = largest_within(by_speed, faster, sized)
    return best, (speed_loss if speed_loss is not None else size_loss), evals

