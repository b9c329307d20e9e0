"""Clip search: per (output row, group) INT4 range ratios chosen against the layer's output error.

Rounding to the full range of a group wastes most of the 16 levels on its one or two extreme
weights; shrinking the range saturates those and gives the rest finer steps. Which ratio wins
depends on the inputs the group meets, so each (row, group) takes the grid ratio in
``[1 - MAX_SHRINK, 1]`` whose output error ``d^T H_gg d`` is smallest, ``H_gg`` the group's diagonal
block of the input's Gram matrix (the Hessian GPTQ accumulates, first-token weighting included):
every calibration token counts, at the cost of one ``[G, gs, gs]`` contraction per candidate.

AWQ's reference implementation searches this after its scales (on sampled rows); every INT4
algorithm here runs it before rounding (``Recipe.weight_clip``): the ratios fix the group grids
that AWQ's rounding or GPTQ's error feedback then fill (on SmolLM2 sym g64, GPTQ 23.12 -> 22.49
perplexity with it, ``benchmarks/experiments/int4_eager.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from qcompiler.ir import int4

MAX_SHRINK = 0.5        # smallest ratio tried is 1 - MAX_SHRINK, as in AWQ's reference implementation


def ratios(grid: int) -> list:
    """The candidate ratios, largest (no clipping) first."""
    return [1.0 - MAX_SHRINK * i / grid for i in range(grid)]


def group_grams(h: Tensor, group_size: int) -> Tensor:
    """The diagonal ``[G, group_size, group_size]`` blocks of ``h`` (zero-padded to whole groups)."""
    g = int4.groups(h.shape[0], group_size)
    pad = g * group_size - h.shape[0]
    h = torch.nn.functional.pad(h.to(torch.float32), (0, pad, 0, pad)).reshape(g, group_size, g, group_size)
    return torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1)


def search(w: Tensor, h: Tensor, group_size: int, symmetric: bool, grid: int, chunk: int = 256) -> Tensor:
    """[N, G] ratios for ``w`` [N, K] on inputs whose Gram matrix is ``h`` [K, K]; 1 where no
    ratio lowers the group's error (ties keep the larger range)."""
    grams = group_grams(h, group_size)                        # [G, gs, gs]
    wg = int4.grouped(w, group_size)                          # [N, G, gs]
    best = torch.ones(wg.shape[:2])
    for start in range(0, wg.shape[0], chunk):
        part = wg[start:start + chunk]
        flat = part.reshape(part.shape[0], -1)
        best_err = torch.full(part.shape[:2], float("inf"))
        for r in ratios(grid):
            scale, zero = int4.scale_zero(flat, group_size, symmetric, r)
            q = int4.codes(flat, scale, zero, group_size)
            d = int4.dequantize_codes(q, scale, zero, group_size, q.shape[1]).reshape(part.shape) - part
            err = torch.einsum("ngs,gst,ngt->ng", d, grams, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start:start + chunk] = torch.where(better, torch.tensor(r), best[start:start + chunk])
    return best
