"""AWQ: activation-aware INT4 weight scaling and clipping for a group of linears sharing an input.

AWQ (Lin et al., 2023) protects the weights that meet large activations: each input channel j is
scaled, ``W[:, j] * s_j`` is rounded and the input is divided by ``s_j`` (folded into the
producing norm when possible), with ``s = mean|x|^a / mean|w~|^(1-a)`` (``w~`` the weights
normalised by their group's absmax), normalised to a geometric mean of 1. ``a`` is searched on a
grid against the group's output error; ``s = 1`` (plain rounding) is always a candidate, so the
chosen scales are never worse than round-to-nearest on the calibration data. A per-(row, group)
clip ratio of the scaled weight is then searched (``qcompiler.algorithms.clip_search``), as in the reference
implementation; ``qcompiler.algorithms.rounding.round_weights`` runs the steps in order.

The scale search scores candidates on the input's Gram matrix ``H = X^T X`` (the Hessian GPTQ uses,
first-token weighting included), ``||D X^T||^2 = tr(D H D^T)``: every calibration token counts,
where the reference implementation scores a sample of rows, and the search costs no more (on
SmolLM2 sym g64: 97 s against 142 s with 1,024 / 512 sampled rows, perplexity 23.41 against 23.44,
benchmarks/experiments/int4_eager.py with 16 calibration and 16 test windows).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler.ir import int4

_MIN = 1e-4


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
