"""Scale refit: least-squares group scales for INT4 codes that are already chosen.

After AWQ or GPTQ has picked each weight's 4-bit code, the layer's output is linear in the group
scales: with centred codes ``c = u - zero``, output row n is ``y_n = sum_g s[n, g] (X_g c[n, g])``.
So the scales that minimise ``||X (W - Q)^T||^2`` on the calibration rows, codes fixed, solve one
small system per output row, ``M_n s_n = b_n`` with

    M_n[g, h] = c[n, g]^T H[g, h] c[n, h]        b_n[g] = c[n, g]^T (H w_n)[g]

where ``H = X^T X`` is the Hessian GPTQ already accumulates (first-token weighting included).
Nothing but the float32 scales changes, so the packed layout, and every lowering, is untouched.

A row keeps its old scales when the solution would make one of them non-positive (the TensorRT
form needs positive scales) or would not lower that row's error: the result is never worse than
its input on the calibration data.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qcompiler.ir import int4

_RIDGE = 1e-6   # relative to the mean diagonal of M: keeps groups of all-zero codes solvable


def _row_error(s: Tensor, m: Tensor, b: Tensor) -> Tensor:
    """``s^T M s - 2 b^T s`` per row: the output error up to a constant that the scales do not move."""
    return torch.einsum("ng,ngh,nh->n", s, m, s) - 2 * (b * s).sum(-1)


def refit(p: int4.PackedInt4, weight: Tensor, hessian: Tensor, chunk: int = 256) -> int4.PackedInt4:
    """``p`` with each row's group scales refitted to ``weight``'s outputs under ``hessian`` [K, K]."""
    n, g = p.scale.shape
    gs, k = p.group_size, p.in_features
    pad = g * gs - k
    h = torch.nn.functional.pad(hessian.to(torch.float64), (0, pad, 0, pad))
    h4 = h.reshape(g, gs, g, gs)
    c_all = int4.centred_codes(p, torch.float64)                                    # [N, G, gs]
    wh_all = torch.nn.functional.pad(weight.detach().to(torch.float64), (0, pad)) @ h  # H w_n, [N, G*gs]
    scale = p.scale.clone()
    for r0 in range(0, n, chunk):   # [rows, G, gs, G] intermediates stay bounded
        c = c_all[r0:r0 + chunk]
        m = torch.einsum("ngi,ngih->ngh", c, torch.einsum("gihj,nhj->ngih", h4, c))
        b = (c * wh_all[r0:r0 + chunk].reshape(-1, g, gs)).sum(-1)
        ridge = _RIDGE * torch.diagonal(m, dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        s = torch.linalg.solve(m + ridge[:, None, None] * torch.eye(g, dtype=m.dtype), b)
        old = p.scale[r0:r0 + chunk].to(torch.float64)
        better = (s > 0).all(-1) & torch.isfinite(s).all(-1) & (_row_error(s, m, b) < _row_error(old, m, b))
        scale[r0:r0 + chunk] = torch.where(better[:, None], s, old).to(torch.float32)
    return int4.PackedInt4(p.packed, scale, p.zero, gs, k)
