"""INT4 weights in groups along K, activations in floating point: ``linear_w4a16``.

The codes come from round-to-nearest here, or from AWQ / GPTQ at calibration
(``qcompiler.algorithms.rounding``), handed in as the layer's prepared weight.
"""
from __future__ import annotations

import torch

from qcompiler.ir import int4, ops
from qcompiler.schemes import fake_quant
from qcompiler.schemes.base import GroupedInt4Weight, Scheme

qops = torch.ops.qcompile


class Int4Grouped(Scheme):
    qop = "linear_w4a16"

    def describe(self, recipe) -> str:
        grid = "symmetric" if recipe.symmetric else "asymmetric"
        return f"INT4 weights, group {recipe.group_size}, {grid}, {recipe.algorithm.upper()}"

    def quantize_weight(self, weight, recipe, prepared):
        p = prepared.weight if prepared is not None and prepared.weight is not None else \
            int4.quantize(weight, recipe.group_size, recipe.symmetric)
        return GroupedInt4Weight(p.packed, p.scale, p.zero)

    def reference(self, x, weight, *, bias, smooth_inv, x_scale, recipe):
        return ops.linear_w4a16_ref(x, weight.w4, weight.w4scale, weight.w4zero, smooth_inv, recipe.group_size, bias)

    def emit(self, graph, x, weight, *, bias, smooth_inv, x_scale, recipe, out_dtype):
        return graph.call_function(qops.linear_w4a16.default, (x, weight.w4, weight.w4scale, weight.w4zero,
                                                               smooth_inv, recipe.group_size, bias))

    def learned_scales(self, weight):
        return weight.w4scale, weight.w4zero

    def dequantized(self, weight, recipe, in_features):
        return int4.dequantize(weight.w4, weight.w4scale, weight.w4zero, recipe.group_size, in_features)

    def fake_weight(self, w, scale, zero, recipe):
        return fake_quant.int4_grouped(w, scale, zero, recipe.group_size)

    def trained_weight(self, w, scale, zero, recipe):
        w = w.detach().to(torch.float32)
        scale = fake_quant.positive(scale.detach().to(torch.float32)).contiguous()
        return int4.from_codes(int4.codes(w, scale, zero, recipe.group_size), scale, zero, recipe.group_size,
                               w.shape[1])
