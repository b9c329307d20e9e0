"""``QATLinear``: a linear layer that computes in training what its compiled q-op computes.

It takes the place of an ``nn.Linear`` (or transformers' ``Conv1D``) under the same name and keeps
that layer's own ``weight`` and ``bias`` Parameters (same objects, same layout, so a state dict
reads as before), plus plain ``nn.Parameter`` scales: ``weight_scale`` (per output channel, or
per group for INT4) and, for static activations, ``input_scale``. No tensor subclass anywhere:
DDP, FSDP2 and any optimizer see ordinary parameters.

Forward (the scheme's fake quantization, ``qcompiler.schemes.fake_quant``): the input divided by
AWQ's smoothing scale ``s`` when the weights absorbed one, quantized as the recipe's activations are
(per token, per tensor, or not at all), times the weight on its grid under the learned scales.
With ``teaching`` set the layer is the floating-point layer the training started from (its
``teacher_weight`` when the trained weight started elsewhere: AWQ / GPTQ codes), which is how
``qcompiler.qat.distill`` gets a teacher without a second model.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QATLinear(nn.Module):
    """See the module docstring. ``name`` is the layer's qualified name in the model; ``scheme`` and
    ``recipe`` the layer's own (per-module overrides applied)."""

    def __init__(self, source: nn.Module, name: str, scheme, recipe, *, transposed: bool, scale: Tensor,
                 zero: Optional[Tensor], smooth_scale: Optional[Tensor], input_scale: Optional[Tensor],
                 teacher_weight: Optional[Tensor]):
        super().__init__()
        self.weight = source.weight
        self.bias = source.bias
        self.weight_scale = nn.Parameter(scale.detach().to(torch.float32).clone())
        self.input_scale = None if input_scale is None else nn.Parameter(input_scale.detach().to(torch.float32).clone())
        self.register_buffer("weight_zero", zero, persistent=True)
        # AWQ's per-input-channel scale s: the grid is of W * s, the input is divided by s
        self.register_buffer("smooth_scale", smooth_scale, persistent=True)
        # the floating-point weight the teacher uses, when the trained weight did not start from it
        self.register_buffer("teacher_weight", teacher_weight, persistent=False)
        self.name, self.scheme, self.recipe, self.transposed = name, scheme, recipe, transposed
        self.in_features, self.out_features = (self.weight.shape[::-1] if transposed else self.weight.shape)
        self.teaching = False
        self.__dict__["source"] = source   # the layer convert() puts back (not a submodule: no second copy)

    def linear_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """A weight in ``[out, in]``, as ``F.linear`` takes it."""
        weight = self.weight if weight is None else weight
        return weight.t() if self.transposed else weight

    def scaled_weight(self) -> Tensor:
        """The weight the grid is of: ``W`` [out, in] in float32, times AWQ's ``s`` when it has one."""
        w = self.linear_weight().to(torch.float32)
        return w if self.smooth_scale is None else w * self.smooth_scale

    def quantized_weight(self) -> Tensor:
        """The weight on its grid (float32, [out, in]); differentiable in the weight and its scales."""
        return self.scheme.fake_weight(self.scaled_weight(), self.weight_scale, self.weight_zero, self.recipe)

    def forward(self, x: Tensor) -> Tensor:
        if self.teaching:
            w = self.linear_weight(self.teacher_weight) if self.teacher_weight is not None else self.linear_weight()
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        # 1 / s as the quantize pass computes it (ops.linear_w4a16_ref multiplies by it)
        xs = x if self.smooth_scale is None else x * (1.0 / self.smooth_scale).to(x.dtype)
        xq = self.scheme.fake_input(xs, self.input_scale, self.recipe).to(x.dtype)
        return F.linear(xq, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.scheme.describe(self.recipe)}"
