"""8-bit weights per output channel, 8-bit activations per tensor with a calibrated scale:
``quantize_per_tensor`` then ``linear_w8a8`` (the form TensorRT's explicit quantization takes)."""
from __future__ import annotations

import torch

from qcompiler.ir import ops
from qcompiler.schemes import fake_quant
from qcompiler.schemes.base import FORMAT_TEXT, PerChannel8Bit

qops = torch.ops.qcompile


class PerTensor8Bit(PerChannel8Bit):
    qop = "linear_w8a8"

    def describe(self, recipe) -> str:
        return self.formats(f"{FORMAT_TEXT[self.key.activations]} activations per tensor ({recipe.observer})")

    def reference(self, x, weight, *, bias, smooth_inv, x_scale, recipe):
        xq = ops.quantize_per_tensor_ref(x, x_scale, smooth_inv, self.activation_dtype)
        return ops.linear_w8a8_ref(xq, x_scale, weight.wq, weight.wscale, bias, torch.float32)

    def emit(self, graph, x, weight, *, bias, smooth_inv, x_scale, recipe, out_dtype):
        """The static linear, plus each input row's NaN carrier: a calibrated scale saturates NaN
        and Inf to finite codes, where the floating-point linear (and the per-token scale) gives the
        row NaN or Inf. ``(x - x).sum(-1)`` is exactly 0 for a finite row (no overflow, whatever the
        dtype) and NaN for a row holding NaN or Inf; added to the output, it carries that row's fault."""
        xq = graph.call_function(qops.quantize_per_tensor.default, (x, x_scale, smooth_inv, self.activation_dtype))
        y = graph.call_function(qops.linear_w8a8.default, (xq, x_scale, weight.wq, weight.wscale, bias, out_dtype))
        carrier = graph.call_function(torch.sum, (graph.call_function(torch.sub, (x, x)),),
                                      {"dim": -1, "keepdim": True})
        return graph.call_function(torch.add, (y, carrier))

    def fake_input(self, x, x_scale, recipe):
        return fake_quant.per_tensor(x, x_scale, self.activation_dtype)
