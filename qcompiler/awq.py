"""AWQ: activation-aware INT4 weight scaling and clipping for a group of linears sharing an input.

AWQ (Lin et al., 2023) protects the weights that meet large activations: each input channel j is
scaled, ``W[:, j] * s_j`` is rounded and the input is divided by ``s_j`` (folded into the
producing norm when possible), with ``s = mean|x|^a / mean|w~|^(1-a)`` (``w~`` the weights
normalised by their group's absmax), normalised to a geometric mean of 1. ``a`` is searched on a
grid against the group's output error; ``s = 1`` (plain rounding) is always a candidate, so the
chosen scales are never worse than round-to-nearest on the calibration data. A per-(row, group)
clip ratio of the scaled weight is then searched against each group's share of the output error,
as in the reference implementation.

Both searches score candidates on the input's Gram matrix ``H = X^T X`` (the Hessian GPTQ uses,
first-token weighting included), ``||D X^T||^2 = tr(D H D^T)``: every calibration token counts,
where the reference implementation scores a sample of rows, and the searches cost no more (on
SmolLM2 sym g64: 97 s against 142 s with 1,024 / 512 sampled rows, perplexity 23.41 against 23.44,
benchmarks/int4_eager.py with 16 calibration and 16 test windows).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler import int4

_MIN = 1e-4
MAX_SHRINK = 0.5        # smallest clip ratio tried, as in the reference implementation


def output_error(weights: list, h: Tensor, s: Optional[Tensor], group_size: int, symmetric: bool,
                 base: Optional[list] = None) -> float:
    """Sum over the group of ``tr(D H D^T) / tr(W H W^T)``, ``D = Q(W s) / s - W``: each linear's
    relative output error on inputs whose Gram matrix is ``h`` ``[K, K]`` (GPTQ's Hessian, first
    token weighting included, so every calibration token counts, not a sample of rows).

    ``base`` (the ``tr(W H W^T)``, computed once by a search) saves a GEMM per candidate.
    """
    total = 0.0
    for i, w in enumerate(weights):
        w_hat = int4.fake_quantize(w if s is None else w * s, group_size, symmetric)
        if s is not None:
            w_hat = w_hat / s
        d = w_hat - w
        ref = base[i] if base is not None else ((w @ h) * w).sum()
        total += (((d @ h) * d).sum() / ref.clamp_min(1e-30)).item()
    return total


def search_scale(weights: list, h: Tensor, mean_abs: Tensor, group_size: int, symmetric: bool,
                 grid: int) -> tuple[Tensor, Optional[float]]:
    """(s [K], exponent a; None when plain rounding won) for linears reading one input whose Gram
    matrix is ``h``."""
    w = torch.cat(weights)
    g = int4.grouped(w, group_size)
    w_norm = (g.abs() / g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(w.shape[0], -1)
    w_mean = w_norm[:, :w.shape[1]].mean(dim=0)
    base = [((w @ h) * w).sum() for w in weights]
    best = (output_error(weights, h, None, group_size, symmetric, base), None, torch.ones_like(mean_abs))
    for i in range(grid):
        a = i / grid
        s = mean_abs.clamp_min(_MIN).pow(a) / w_mean.clamp_min(_MIN).pow(1 - a)
        s = (s / (s.max() * s.min()).sqrt()).clamp_min(_MIN)
        err = output_error(weights, h, s, group_size, symmetric, base)
        if err < best[0]:
            best = (err, a, s)
    return best[2], best[1]


def group_grams(h: Tensor, group_size: int) -> Tensor:
    """The diagonal ``[G, group_size, group_size]`` blocks of ``h`` (zero-padded to whole groups)."""
    g = int4.groups(h.shape[0], group_size)
    pad = g * group_size - h.shape[0]
    h = torch.nn.functional.pad(h.to(torch.float32), (0, pad, 0, pad)).reshape(g, group_size, g, group_size)
    return torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(w: Tensor, h: Tensor, group_size: int, symmetric: bool, grid: int,
                chunk: int = 256) -> Tensor:
    """Per (output row, group) clip ratio in [MAX_SHRINK, 1] minimising that group's output error
    ``d^T H_gg d`` (``H_gg`` the group's diagonal block of the input's Gram matrix ``h``).

    ``w`` and ``h`` are already scaled (``W s`` and the Gram matrix of ``x / s``).
    """
    grams = group_grams(h, group_size)                        # [G, gs, gs]
    wg = int4.grouped(w, group_size)                          # [N, G, gs]
    ratios = [1.0 - MAX_SHRINK * i / grid for i in range(grid)]
    best = torch.ones(wg.shape[:2])
    for start in range(0, wg.shape[0], chunk):
        part = wg[start:start + chunk]
        flat = part.reshape(part.shape[0], -1)
        best_err = torch.full(part.shape[:2], float("inf"))
        for r in ratios:
            scale, zero = int4.scale_zero(flat, group_size, symmetric, r)
            q = int4.codes(flat, scale, zero, group_size)
            d = int4.dequantize_codes(q, scale, zero, group_size, q.shape[1]).reshape(part.shape) - part
            err = torch.einsum("ngs,gst,ngt->ng", d, grams, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start:start + chunk] = torch.where(better, torch.tensor(r), best[start:start + chunk])
    return best


def awq(weights: list, h: Tensor, mean_abs: Tensor, group_size: int, symmetric: bool,
        grid: int = 20, clip: bool = True) -> tuple[list, Tensor, Optional[float]]:
    """([PackedInt4 of W s per linear], s, exponent) for linears that read the same input, whose
    Gram matrix ``h`` scores the scale and the clip searches."""
    weights = [w.detach().to(torch.float32) for w in weights]
    h = h.to(torch.float32)
    s, a = search_scale(weights, h, mean_abs, group_size, symmetric, grid)
    hs = h / s[:, None] / s[None, :]
    packed = []
    for w in weights:
        ws = w * s
        ratio = search_clip(ws, hs, group_size, symmetric, grid) if clip else 1.0
        packed.append(int4.quantize(ws, group_size, symmetric, ratio))
    return packed, s, a
