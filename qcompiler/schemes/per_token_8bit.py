"""8-bit weights per output channel, 8-bit activations per token at run time:
``quantize_per_token`` then ``linear_w8a8`` (INT8 or FP8 E4M3, as the key says)."""
from __future__ import annotations

import operator

import torch

from qcompiler.ir import ops
from qcompiler.schemes import fake_quant
from qcompiler.schemes.base import FORMAT_TEXT, PerChannel8Bit

qops = torch.ops.qcompile


class PerToken8Bit(PerChannel8Bit):
    qop = "linear_w8a8"

    def describe(self, recipe) -> str:
        return self.formats(f"{FORMAT_TEXT[self.key.activations]} activations per token")

    def reference(self, x, weight, *, bias, smooth_inv, x_scale, recipe):
        xq, sx = ops.quantize_per_token_ref(x, smooth_inv, self.activation_dtype)
        return ops.linear_w8a8_ref(xq, sx, weight.wq, weight.wscale, bias, torch.float32)

    def emit(self, graph, x, weight, *, bias, smooth_inv, x_scale, recipe, out_dtype):
        q = graph.call_function(qops.quantize_per_token.default, (x, smooth_inv, self.activation_dtype))
        xq, sx = graph.call_function(operator.getitem, (q, 0)), graph.call_function(operator.getitem, (q, 1))
        return graph.call_function(qops.linear_w8a8.default, (xq, sx, weight.wq, weight.wscale, bias, out_dtype))

    def fake_input(self, x, x_scale, recipe):
        return fake_quant.per_token(x, self.activation_dtype)
