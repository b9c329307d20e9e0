"""8-bit weights per output channel, INT8 activations per block of input channels at run time:
one ``linear_w8a8_blocks`` (the activation's quantization is part of the op, since each block's
scale weighs its own slice of the dot product).

A block of 32 channels is llama.cpp's Q8_0 activation grain: an outlier channel coarsens the
rounding of its 31 neighbours only, where a per-token scale coarsens the whole row. On ONNX
Runtime's CPU kernels the op is one ``MatMulNBits`` (8-bit, accuracy level 4), which quantizes
its float input exactly this way.
"""
from __future__ import annotations

import torch

from qcompiler.ir import ops
from qcompiler.schemes import fake_quant
from qcompiler.schemes.base import FORMAT_TEXT, PerChannel8Bit

qops = torch.ops.qcompile

ACT_BLOCK = 32  # input channels per activation scale


class PerBlock8Bit(PerChannel8Bit):
    qop = "linear_w8a8_blocks"

    def describe(self, recipe) -> str:
        return self.formats(f"{FORMAT_TEXT[self.key.activations]} activations per block of {ACT_BLOCK} channels")

    def reference(self, x, weight, *, bias, smooth_inv, x_scale, recipe):
        return ops.linear_w8a8_blocks_ref(x, smooth_inv, weight.wq, weight.wscale, bias, ACT_BLOCK, torch.float32)

    def emit(self, graph, x, weight, *, bias, smooth_inv, x_scale, recipe, out_dtype):
        return graph.call_function(qops.linear_w8a8_blocks.default,
                                   (x, smooth_inv, weight.wq, weight.wscale, bias, ACT_BLOCK, out_dtype))

    def fake_input(self, x, x_scale, recipe):
        return fake_quant.per_block(x, ACT_BLOCK, self.activation_dtype)
