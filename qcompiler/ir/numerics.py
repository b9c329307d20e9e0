"""Number formats shared by every q-op: the 8-bit types, their ranges, symmetric rounding, a row's blocks,
and the blocks of rows a large weight is quantized in.

INT8 ``q = clamp(round_half_even(x / scale), -128, 127)``; FP8 E4M3 ``q = fp8(clamp(x / scale,
-448, 448))``; ``scale = amax / qmax`` in float32, never zero (see ``qcompiler.ir.ops``).
"""
from __future__ import annotations

import torch
from torch import Tensor

QMIN, QMAX = -128, 127
FP8 = torch.float8_e4m3fn
# qdtype -> the largest magnitude it represents (the scale maps amax onto it)
QMAXES = {torch.int8: float(QMAX), FP8: float(torch.finfo(FP8).max)}
# Scales are amax / 127; keep them strictly positive so all-zero rows quantize to 0, not NaN.
MIN_AMAX = 1e-12


def round_clamp(x: Tensor, qdtype: torch.dtype = torch.int8) -> Tensor:
    """Scaled values -> ``qdtype`` codes (INT8 rounds half to even then clamps; FP8 clamps then casts)."""
    if qdtype == torch.int8:
        return torch.clamp(torch.round(x), QMIN, QMAX).to(torch.int8)
    if qdtype == FP8:
        return torch.clamp(x, -QMAXES[FP8], QMAXES[FP8]).to(FP8)
    raise ValueError(f"unsupported quantized dtype {qdtype}; supported: {list(QMAXES)}")


def scale_from_amax(amax: Tensor, qdtype: torch.dtype = torch.int8) -> Tensor:
    """Symmetric scale mapping an absolute maximum onto ``qdtype``'s range (float32, never zero)."""
    return (amax.to(torch.float32).clamp_min(MIN_AMAX) / QMAXES[qdtype]).to(torch.float32)


def quantize_rows(x: Tensor, qdtype: torch.dtype = torch.int8) -> tuple:
    """Each row (last dimension) with its own scale: (codes, float32 scale ``x.shape[:-1] + (1,)``)."""
    x = x.to(torch.float32)
    scale = scale_from_amax(x.abs().amax(dim=-1, keepdim=True), qdtype)
    return round_clamp(x / scale, qdtype), scale


def split_blocks(x: Tensor, block_size: int) -> Tensor:
    """``[..., K]`` -> ``[..., ceil(K / block_size), block_size]``, zeros padding a short last block."""
    k = x.shape[-1]
    blocks = -(-k // block_size)
    return torch.nn.functional.pad(x, (0, blocks * block_size - k)).reshape(*x.shape[:-1], blocks, block_size)


def join_blocks(grouped: Tensor, k: int) -> Tensor:
    """``split_blocks`` undone: ``[..., blocks, block_size]`` -> ``[..., K]``, the padding dropped.

    The whole blocks are flattened and the short last block's head appended: Inductor's CPU code
    for a flattened view sliced mid-block (``reshape(..., -1)[..., :k]``) writes only the first
    block's columns when a dtype cast follows (torch 2.13; the rest of the output is left
    uninitialised), which this form never meets (tests/unit/test_padded_blocks.py)."""
    size = grouped.shape[-1]
    full, rest = divmod(k, size)
    head = grouped[..., :full, :].reshape(*grouped.shape[:-2], full * size)
    return head if not rest else torch.cat([head, grouped[..., full, :rest]], dim=-1)


WEIGHT_CHUNK_ELEMENTS = 1 << 20  # elements of a weight quantized at a time: a whole table's float temporaries are GBs


def row_blocks(w: Tensor) -> list:
    """Slices of the rows of ``w`` ``[N, K]``, about ``WEIGHT_CHUNK_ELEMENTS`` elements each, to
    quantize a large weight (an embedding table) a block of rows at a time, its float temporaries
    those of a block; one slice of every row for a small weight or one that needs gradients."""
    rows = max(1, WEIGHT_CHUNK_ELEMENTS // max(1, w.shape[-1]))
    if w.requires_grad or w.shape[0] <= rows:
        return [slice(None)]
    return [slice(start, start + rows) for start in range(0, w.shape[0], rows)]
