"""Scale tuning: after AWQ / GPTQ chose every INT4 code, train the group scales end to end.

The rounding algorithms each minimise one layer's output error on its own calibration inputs;
what the user measures is the model's output. With the codes fixed, the model is differentiable
in its group scales, so this stage trains them (``scale = s0 * exp(theta)``: positive, as the
TensorRT form needs, and starting exactly at the algorithm's scales) by Adam with a cosine
learning-rate decay, to make the quantized model's output match the floating-point model's on
the calibration batches: KL divergence of the next-token distributions when the output has
``logits``, else the squared error relative to the float output's. Nothing but the float32 scales
changes, so the packed layout, and every lowering, is untouched.

``rounding.prepare`` runs it after the block-wise pass when a recipe sets
``tune_epochs``. Unlike that pass, each step holds the whole model's activations for one batch
(with gradients), so it is an opt-in stage. On SmolLM2-135M (sym g64, 32 calibration windows of
512 tokens, 16 test windows, FP32 19.50; ``benchmarks/accuracy.py``) four epochs take GPTQ from
22.38 to 21.26 perplexity and AWQ from 23.17 to 21.15, in about 9 minutes on 2 CPU cores.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from qcompiler.algorithms.logits_kl import logits_kl
from qcompiler.calibration.recorder import call_model, call_model_with
from qcompiler.calibration.state import is_linear, stored_weight
from qcompiler.errors import CalibrationError
from qcompiler.ir import int4


@dataclass
class _Scales:
    """One linear's trainable scales: ``weight = codes * s0 * exp(theta) (/ smooth_scale)``."""

    name: str
    param: Tensor                  # the model's weight Parameter (the prepared dict's key)
    codes: Tensor                  # float32 [N, G, group_size], u - zero
    packed: int4.PackedInt4
    smooth_scale: object
    theta: Tensor
    module: nn.Module              # the layer (its own weight layout: Conv1D stores [in, out])

    def weight(self) -> Tensor:
        p = self.packed
        w = (self.codes * (p.scale * self.theta.exp())[..., None]).reshape(p.scale.shape[0], -1)[:, :p.in_features]
        return stored_weight(self.module, w if self.smooth_scale is None else w / self.smooth_scale)

    def tuned(self) -> int4.PackedInt4:
        return dataclasses.replace(self.packed, scale=(self.packed.scale * self.theta.detach().exp()).contiguous())


def judged_output(out) -> tuple[Tensor, bool]:
    """(the tensor a model's output is judged by, whether it is logits): ``logits`` when the output
    has them (an attribute or a key), else ``last_hidden_state``, else the first tensor it holds."""
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
        if isinstance(value, Tensor):
            return value, key == "logits"
    if isinstance(out, Mapping):
        out = next((v for v in out.values() if isinstance(v, Tensor)), None)
    elif isinstance(out, (tuple, list)):
        out = out[0] if out else None
    if not isinstance(out, Tensor):
        raise CalibrationError(f"scale tuning compares the model's outputs, but the model returned "
                               f"{type(out).__name__}, not a tensor; set tune_epochs=0 for this model")
    return out, False


def output_loss(quantized, reference, is_logits: bool) -> Tensor:
    """KL(float || quantized) per position over the last dimension of logits, else relative MSE."""
    if is_logits:
        return logits_kl(quantized, reference)
    q, ref = quantized.float(), reference.float()
    return (q - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)


def tune(model: nn.Module, batches: list, prepared: dict, epochs: int, lr: float, *,
         progress: bool = True, seed: int = 0) -> tuple[dict, tuple]:
    """(``prepared`` with every INT4 weight's scales trained, (first-epoch loss, last-epoch loss)).

    ``prepared`` maps weight Parameters to ``PreparedWeight``; entries without an INT4 weight
    (floating point, 8-bit) pass through unchanged and stay fixed during training.
    """
    from tqdm.auto import tqdm

    scales = []
    for name, mod in model.named_modules():
        p = prepared.get(mod.weight) if is_linear(mod) else None
        if p is not None and isinstance(p.weight, int4.PackedInt4):
            scales.append(_Scales(f"{name}.weight", mod.weight, int4.centred_codes(p.weight), p.weight, p.smooth_scale,
                                  torch.zeros_like(p.weight.scale, requires_grad=True), mod))
    if not scales or epochs == 0:
        return prepared, (float("nan"), float("nan"))
    opt = torch.optim.Adam([s.theta for s in scales], lr=lr)
    steps = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    gen = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    epoch_loss = []
    bar = tqdm(total=steps, desc="qcompile scale tuning", unit="batch", disable=not progress, leave=False)
    try:
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(batches), generator=gen).tolist():
                with torch.no_grad():
                    ref = call_model(model, batches[i])
                ref, is_logits = judged_output(ref)
                out, _ = judged_output(call_model_with(model, {s.name: s.weight() for s in scales}, batches[i]))
                loss = output_loss(out, ref, is_logits)
                if not torch.isfinite(loss):
                    raise CalibrationError(f"scale tuning diverged (loss {loss.item()}): lower tune_lr "
                                           f"(now {lr}) or set tune_epochs=0")
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item()
                bar.update()
            epoch_loss.append(total / len(batches))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        bar.close()
    out = dict(prepared)
    for s in scales:
        p = prepared[s.param]
        reason = f"{p.reason}, scales tuned end to end" if p.reason else "scales tuned end to end"
        out[s.param] = dataclasses.replace(p, weight=s.tuned(), reason=reason)
    return out, (epoch_loss[0], epoch_loss[-1])
