"""8-bit weights per output channel, activations in floating point: ``linear_w8a16``.

Also what a layer runs as when its activations failed a guard and its weights did not (INT8).
"""
from __future__ import annotations

import torch

from qcompiler.ir import ops
from qcompiler.schemes.base import PerChannel8Bit

qops = torch.ops.qcompile


class WeightOnly8Bit(PerChannel8Bit):
    qop = "linear_w8a16"

    def describe(self, recipe) -> str:
        return self.formats("weights only")

    def reference(self, x, weight, *, bias, smooth_inv, x_scale, recipe):
        return ops.linear_w8a16_ref(x, weight.wq, weight.wscale, bias)

    def emit(self, graph, x, weight, *, bias, smooth_inv, x_scale, recipe, out_dtype):
        return graph.call_function(qops.linear_w8a16.default, (x, weight.wq, weight.wscale, bias))
