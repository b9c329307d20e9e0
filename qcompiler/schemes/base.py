"""What a scheme is: how one kind of quantized linear is made, computed and put in a graph.

A ``Scheme`` (one subclass per kind, one file each) quantizes a weight once
(``quantize_weight`` -> a ``QuantizedWeight`` of named tensors), computes the layer through the
reference q-ops (``reference``: the numerics every target is tested against and the SQNR the
guards read), and emits the q-op nodes that replace the linear (``emit``, the same call with
graph nodes in place of tensors). Its ``qop`` names the q-op, which is the key of the kernel
tables (``runtimes/linear_kernels.py``). The scheme's ``key`` says which formats it was made for.

For quantization-aware training (``qcompiler.qat``) a scheme also computes the same numerics as
a differentiable function: ``learned_scales`` (where training starts), ``fake_weight`` and
``fake_input`` (``qcompiler.schemes.fake_quant``: straight-through rounding, LSQ scale gradients)
and ``trained_weight`` (the codes and scales the quantize pass then takes as a prepared weight).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, fx

from qcompiler.ir import ops
from qcompiler.ir.numerics import round_clamp
from qcompiler.schemes import fake_quant
from qcompiler.schemes.registry import SchemeKey

QDTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
FORMAT_TEXT = {"int8": "INT8", "fp8": "FP8", "int4": "INT4"}


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear's weight as its scheme stores it: tensors at compile time, the get_attr nodes of
    the same tensors in ``emit``. Subclasses name the fields; a None field is absent."""

    def tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def map(self, fn: Callable) -> "QuantizedWeight":
        """The same weight with every present field ``v`` (named ``k``) replaced by ``fn(k, v)``."""
        return dataclasses.replace(self, **{k: fn(k, v) for k, v in self.tensors().items()})

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors().values())


@dataclass(frozen=True)
class PerChannelWeight(QuantizedWeight):
    """8-bit codes [N, K] and one float32 scale per output channel [N]."""

    wq: object
    wscale: object


@dataclass(frozen=True)
class GroupedInt4Weight(QuantizedWeight):
    """INT4 codes packed two per byte [N, K/2], float32 scales [N, groups], zero points (asymmetric)."""

    w4: object
    w4scale: object
    w4zero: object = None


class Scheme:
    """One kind of quantized linear ``y = x W^T + b``. ``weight`` is float32 [N, K], already
    multiplied by any smoothing scale s; ``smooth_inv`` (1/s) divides the raw input when the smooth
    pass could not fold it into the producer; ``x_scale`` is a static activation scale."""

    qop: str = ""  # the q-op it emits: qcompiler.ir.ops, and the key of the kernel tables

    def __init__(self, key: SchemeKey):
        self.key = key

    @property
    def weight_dtype(self) -> Optional[torch.dtype]:
        return QDTYPES.get(self.key.weights)

    @property
    def activation_dtype(self) -> Optional[torch.dtype]:
        return QDTYPES.get(self.key.activations)

    def describe(self, recipe) -> str:
        raise NotImplementedError

    def quantize_weight(self, weight: Tensor, recipe, prepared) -> QuantizedWeight:
        """The weight quantized once (``prepared``: a calibration-time ``PreparedWeight`` or None)."""
        raise NotImplementedError

    def reference(self, x: Tensor, weight: QuantizedWeight, *, bias: Optional[Tensor], smooth_inv: Optional[Tensor],
                  x_scale: Optional[Tensor], recipe) -> Tensor:
        """The layer on float rows through the reference q-ops."""
        raise NotImplementedError

    def emit(self, graph: fx.Graph, x: fx.Node, weight: QuantizedWeight, *, bias, smooth_inv, x_scale, recipe,
             out_dtype: torch.dtype) -> fx.Node:
        """The node that replaces the linear (arguments are graph nodes, or None)."""
        raise NotImplementedError

    # ---- training: the same numerics, differentiable (qcompiler.qat)

    def learned_scales(self, weight: QuantizedWeight) -> tuple[Tensor, Optional[Tensor]]:
        """(the weight scales training starts from, the zero points it keeps fixed or None)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained")

    def dequantized(self, weight: QuantizedWeight, recipe, in_features: int) -> Tensor:
        """The float32 [N, K] weight ``weight`` stands for."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained")

    def fake_weight(self, w: Tensor, scale: Tensor, zero: Optional[Tensor], recipe) -> Tensor:
        """``w`` [N, K] on the scheme's weight grid, float32, differentiable in ``w`` and ``scale``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained")

    def fake_input(self, x: Tensor, x_scale: Optional[Tensor], recipe) -> Tensor:
        """The layer's input (already divided by any smoothing scale) as the q-op sees it."""
        return x

    def trained_weight(self, w: Tensor, scale: Tensor, zero: Optional[Tensor], recipe):
        """The codes of ``w`` under the trained scales, in the form ``quantize_weight`` takes as prepared."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained")


def per_channel(weight: Tensor, qdtype: torch.dtype) -> PerChannelWeight:
    """8-bit weights symmetric per output channel (the form of every 8-bit scheme)."""
    return PerChannelWeight(*ops.quantize_per_channel_ref(weight, qdtype))


class PerChannel8Bit(Scheme):
    """A scheme whose weights are 8-bit per output channel, in the key's weight format."""

    def quantize_weight(self, weight, recipe, prepared):
        if prepared is not None and isinstance(prepared.weight, PerChannelWeight):  # trained scales
            return prepared.weight
        return per_channel(weight, self.weight_dtype)

    def learned_scales(self, weight):
        return weight.wscale, None

    def dequantized(self, weight, recipe, in_features):
        return ops.dequantize_ref(weight.wq, weight.wscale[:, None])

    def fake_weight(self, w, scale, zero, recipe):
        return fake_quant.per_channel(w, scale, self.weight_dtype)

    def trained_weight(self, w, scale, zero, recipe):
        scale = fake_quant.positive(scale.detach().to(torch.float32)).contiguous()
        return PerChannelWeight(round_clamp(w.detach().to(torch.float32) / scale[:, None], self.weight_dtype), scale)

    def formats(self, activations: str) -> str:
        """"INT8 weights per channel, <activations>" in the key's formats."""
        return f"{FORMAT_TEXT[self.key.weights]} weights per channel, {activations}"
