"""GPTQ: INT4 rounding of one linear's weight with Hessian-based error feedback.

GPTQ (Frantar et al., 2022) rounds the columns of ``W`` one at a time and spreads each column's
rounding error over the columns not yet rounded, weighted by the inverse Hessian
``H = 2/n X^T X`` of the layer's calibration inputs, so ``||(W - Q) X||`` stays small, not just
``||W - Q||``. As in the reference implementation: dampening ``damp * mean(diag H)`` on the
diagonal, the inverse's upper Cholesky factor, lazy updates in blocks of ``block`` columns, and
optionally columns by decreasing ``diag H`` ("act order") with group scales fixed beforehand so the
groups stay contiguous in the shared packed layout (``qcompiler.ir.int4``).

The output is the same ``PackedInt4`` that round-to-nearest produces: a lowering cannot tell
them apart.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from qcompiler.ir import int4


def _column_quantize(w: Tensor, scale: Tensor, zero) -> tuple[Tensor, Tensor]:
    """(codes, dequantized) of one column ``w`` [N] under per-row scale / zero [N]."""
    z = int4.SYMMETRIC_ZERO if zero is None else zero
    q = torch.clamp(torch.round(w / scale) + z, 0, int4.UMAX)
    return q, (q - z) * scale


def gptq(weight: Tensor, hessian: Tensor, group_size: int, symmetric: bool, damp: float = 0.01,
         block: int = 128, act_order: bool = False, clip: Union[float, Tensor] = 1.0) -> int4.PackedInt4:
    """GPTQ-rounded INT4 of ``weight`` [N, K] given ``hessian`` [K, K] (= 2/n X^T X).

    ``clip`` (a number or [N, G] ratios, as ``int4.scale_zero`` takes) shrinks each group's range
    before rounding: the clip search's result (``qcompiler.algorithms.clip_search``), which fixes the grids
    that the error feedback then fills.
    """
    w = weight.detach().to(torch.float32).clone()
    n, k = w.shape
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    g_count = int4.groups(k, group_size)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    if act_order:
        # static groups: scales from the whole (dead-zeroed) weight, before any error feedback
        scale, zero = int4.scale_zero(w, group_size, symmetric, clip)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        scale = torch.empty(n, g_count)
        zero = None if symmetric else torch.empty(n, g_count)

    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.empty(n, k)
    # blocks of whole groups, so a group's scale is found from weights already error-corrected
    block = max(group_size, block // group_size * group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group_size
            if not act_order and col % group_size == 0:
                ratio = clip[:, g:g + 1] if isinstance(clip, Tensor) else clip
                s, z = int4.scale_zero(w1[:, i:i + group_size], group_size, symmetric, ratio)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0].to(torch.float32)
            zg = None if zero is None else zero[:, g].to(torch.float32)
            q, deq = _column_quantize(w1[:, i], scale[:, g], zg)
            codes[:, col] = q
            e = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if act_order:
        codes = codes[:, torch.argsort(perm)]
    zero_u8 = None if zero is None else zero.to(torch.uint8)
    pad_code = int4.SYMMETRIC_ZERO if zero is None else zero_u8[:, -1:].to(torch.float32)
    padded = torch.cat([codes, torch.zeros(n, g_count * group_size - k) + pad_code], dim=1)
    return int4.from_codes(padded.to(torch.uint8), scale, zero_u8, group_size, k)
