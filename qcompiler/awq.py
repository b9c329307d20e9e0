"""AWQ: activation-aware INT4 weight scaling and clipping for a group of linears sharing an input.

AWQ (Lin et al., 2023) protects the weights that meet large activations: each input channel j is
scaled, ``W[:, j] * s_j`` is rounded and the input is divided by ``s_j`` (folded into the
producing norm when possible), with ``s = mean|x|^a / mean|w~|^(1-a)`` (``w~`` the weights
normalised by their group's absmax), normalised to a geometric mean of 1. ``a`` is searched on a
grid against the group's output error on calibration rows; ``s = 1`` (plain rounding) is always a
candidate, so the chosen scales are never worse than round-to-nearest on those rows. A
per-(row, group) clip ratio of the scaled weight is then searched against each group's share of
the output error, as in the reference implementation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler import int4

_MIN = 1e-4
SEARCH_ROWS = 1024      # calibration rows the scale search scores each candidate on
CLIP_ROWS = 512         # rows for the clip search (it scores every row x group x output row)
MAX_SHRINK = 0.5        # smallest clip ratio tried, as in the reference implementation


def output_error(weights: list, x: Tensor, s: Optional[Tensor], group_size: int, symmetric: bool,
                 outputs: Optional[list] = None) -> float:
    """Sum over the group of ``||x (Q(W s) / s)^T - x W^T||^2 / ||x W^T||^2``.

    ``outputs`` (the ``x W^T``, computed once by a search) saves a GEMM per candidate.
    """
    total = 0.0
    for i, w in enumerate(weights):
        w_hat = int4.fake_quantize(w if s is None else w * s, group_size, symmetric)
        if s is not None:
            w_hat = w_hat / s
        y = outputs[i] if outputs is not None else x @ w.t()
        total += ((x @ w_hat.t() - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)).item()
    return total


def search_scale(weights: list, rows: Tensor, mean_abs: Tensor, group_size: int, symmetric: bool,
                 grid: int) -> tuple[Tensor, Optional[float]]:
    """(s [K], exponent a; None when plain rounding won) for linears reading one input."""
    x = rows[:SEARCH_ROWS]
    w = torch.cat(weights)
    g = int4.grouped(w, group_size)
    w_norm = (g.abs() / g.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)).reshape(w.shape[0], -1)
    w_mean = w_norm[:, :w.shape[1]].mean(dim=0)
    ys = [x @ w.t() for w in weights]
    best = (output_error(weights, x, None, group_size, symmetric, ys), None, torch.ones_like(mean_abs))
    for i in range(grid):
        a = i / grid
        s = mean_abs.clamp_min(_MIN).pow(a) / w_mean.clamp_min(_MIN).pow(1 - a)
        s = (s / (s.max() * s.min()).sqrt()).clamp_min(_MIN)
        err = output_error(weights, x, s, group_size, symmetric, ys)
        if err < best[0]:
            best = (err, a, s)
    return best[2], best[1]


def search_clip(w: Tensor, rows: Tensor, group_size: int, symmetric: bool, grid: int,
                chunk: int = 256) -> Tensor:
    """Per (output row, group) clip ratio in [MAX_SHRINK, 1] minimising that group's output error.

    ``w`` and ``rows`` are already scaled (``W s`` and ``x / s``); ``rows``: ``CLIP_ROWS`` of them.
    """
    x = int4.grouped(rows, group_size)                        # [n, G, gs]
    wg = int4.grouped(w, group_size)                          # [N, G, gs]
    ratios = [1.0 - MAX_SHRINK * i / grid for i in range(grid)]
    best = torch.ones(wg.shape[:2])
    for start in range(0, wg.shape[0], chunk):
        part = wg[start:start + chunk]
        y = torch.einsum("ngs,ogs->nog", x, part)
        best_err = torch.full(part.shape[:2], float("inf"))
        for r in ratios:
            scale, zero = int4.scale_zero(part.reshape(part.shape[0], -1), group_size, symmetric, r)
            q = int4.codes(part.reshape(part.shape[0], -1), scale, zero, group_size)
            deq = int4.dequantize_codes(q, scale, zero, group_size, q.shape[1]).reshape(part.shape)
            err = (torch.einsum("ngs,ogs->nog", x, deq) - y).pow(2).sum(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best[start:start + chunk] = torch.where(better, torch.tensor(r), best[start:start + chunk])
    return best


def awq(weights: list, rows: Tensor, clip_rows: Tensor, mean_abs: Tensor, group_size: int, symmetric: bool,
        grid: int = 20, clip: bool = True) -> tuple[list, Tensor, Optional[float]]:
    """([PackedInt4 of W s per linear], s, exponent) for linears that read the same input; ``rows``
    and ``clip_rows`` score the scale and the clip searches."""
    weights = [w.detach().to(torch.float32) for w in weights]
    s, a = search_scale(weights, rows, mean_abs, group_size, symmetric, grid)
    packed = []
    for w in weights:
        ws = w * s
        ratio = search_clip(ws, clip_rows / s, group_size, symmetric, grid) if clip else 1.0
        packed.append(int4.quantize(ws, group_size, symmetric, ratio))
    return packed, s, a
