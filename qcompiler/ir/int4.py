"""INT4 weights: group-wise scales, the packed layout every lowering shares, and its plain-torch math.

The layout (the reference op, Inductor, ONNX ``MatMulNBits`` / ``DequantizeLinear(int4)`` and
the Triton kernels all read this one form; nothing re-derives it):

* codes are unsigned 4-bit, ``u`` in [0, 15]; the weight is ``(u - zero) * scale``.
  Symmetric: ``zero = 8`` for every group (``u - 8`` is the signed int4 value in [-8, 7]) and no
  zero tensor is stored; asymmetric: one zero point per group, in [0, 15].
* the input dimension K is split into ``G = ceil(K / group_size)`` groups along each output row;
  a K that is not a multiple of the group size (SmolLM2: K = 576 at group 128) is padded with
  codes equal to the zero point, i.e. weights of exactly 0 that the matmul never reads.
* ``packed`` is uint8 ``[N, G * group_size / 2]``: byte j holds code 2j in its low nibble and
  code 2j+1 in its high nibble (the order ONNX and ONNX Runtime use).
* ``scale`` is float32 ``[N, G]``; ``zero`` is uint8 ``[N, G]`` or None (symmetric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from qcompiler.ir.numerics import join_blocks, row_blocks

BITS = 4
UMAX = 2**BITS - 1                    # 15
SYMMETRIC_ZERO = 2 ** (BITS - 1)      # 8
SYMMETRIC_QMAX = SYMMETRIC_ZERO - 1   # 7: the largest positive code
_MIN_SCALE = 1e-12


@dataclass(frozen=True)
class PackedInt4:
    """One INT4 weight in the shared layout (see the module docstring)."""

    packed: Tensor             # uint8 [N, G * group_size / 2]
    scale: Tensor              # float32 [N, G]
    zero: Optional[Tensor]     # uint8 [N, G], None when symmetric
    group_size: int
    in_features: int           # K before padding

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def dequantize(self) -> Tensor:
        return dequantize(self.packed, self.scale, self.zero, self.group_size, self.in_features)


def groups(k: int, group_size: int) -> int:
    return -(-k // group_size)


def grouped(w: Tensor, group_size: int) -> Tensor:
    """``[N, K]`` -> ``[N, G, group_size]`` float32, zero-padded along K."""
    n, k = w.shape
    pad = groups(k, group_size) * group_size - k
    w = torch.nn.functional.pad(w.to(torch.float32), (0, pad))
    return w.reshape(n, -1, group_size)


def scale_zero(w: Tensor, group_size: int, symmetric: bool,
               clip: Union[float, Tensor] = 1.0) -> tuple[Tensor, Optional[Tensor]]:
    """Per-group (scale [N, G], zero [N, G] or None) covering the group's range times ``clip``.

    ``clip`` (a number or an [N, G] tensor of ratios in (0, 1]) shrinks the range; values beyond
    it saturate, which AWQ's clip search trades against finer steps for the rest.
    """
    g = grouped(w, group_size)
    # the range always includes 0, so an exact 0 weight (and the padding) stays exactly 0
    wmax, wmin = g.amax(dim=-1).clamp_min(0) * clip, g.amin(dim=-1).clamp_max(0) * clip
    if symmetric:
        # the smallest step whose grid [-8, 7] * scale covers the group: a group whose extreme is
        # negative reaches it with code -8 (SmolLM2 sym g64 RTN: +36% perplexity,
        # +50% at amax / 7; benchmarks/accuracy.py)
        return torch.maximum(wmax / SYMMETRIC_QMAX, -wmin / SYMMETRIC_ZERO).clamp_min(_MIN_SCALE), None
    scale = ((wmax - wmin) / UMAX).clamp_min(_MIN_SCALE)
    zero = torch.clamp(torch.round(-wmin / scale), 0, UMAX)
    return scale, zero.to(torch.uint8)


def codes(w: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int) -> Tensor:
    """uint8 codes ``[N, G * group_size]`` of ``w`` under the given group scales / zero points."""
    g = grouped(w, group_size)
    z = SYMMETRIC_ZERO if zero is None else zero.to(torch.float32)[..., None]
    q = torch.clamp(torch.round(g / scale[..., None]) + z, 0, UMAX)
    return q.to(torch.uint8).reshape(w.shape[0], -1)


def dequantize_codes(q: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int, k: int) -> Tensor:
    """codes ``[N, G * group_size]`` -> float32 weight ``[N, K]``."""
    n = q.shape[0]
    z = SYMMETRIC_ZERO if zero is None else zero.to(torch.float32)[..., None]
    return join_blocks((q.to(torch.float32).reshape(n, -1, group_size) - z) * scale[..., None], k)


def centred_codes(p: PackedInt4, dtype=torch.float32) -> Tensor:
    """``u - zero`` of a packed weight, ``[N, G, group_size]`` (zero on the padding): the weight is
    this times ``scale[..., None]``, which is what the scale refit and the scale tuning solve for."""
    n, g = p.scale.shape
    u = unpack(p.packed).to(dtype).reshape(n, g, p.group_size)
    return u - (SYMMETRIC_ZERO if p.zero is None else p.zero.to(dtype)[..., None])


def pack(q: Tensor) -> Tensor:
    """uint8 codes ``[N, 2M]`` -> bytes ``[N, M]``, even index in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack(packed: Tensor) -> Tensor:
    """bytes ``[N, M]`` -> uint8 codes ``[N, 2M]``."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize(packed: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int, k: int) -> Tensor:
    return dequantize_codes(unpack(packed), scale, zero, group_size, k)


def quantize(w: Tensor, group_size: int, symmetric: bool, clip: Union[float, Tensor] = 1.0) -> PackedInt4:
    """Round-to-nearest INT4 of ``w`` ``[N, K]`` (optionally with per-group clip ratios ``[N, G]``).
    Rows are independent: a large weight goes a block of rows at a time (``numerics.row_blocks``)."""
    parts = []
    for rows in row_blocks(w):
        part_clip = clip[rows] if isinstance(clip, Tensor) and clip.dim() else clip
        scale, zero = scale_zero(w[rows], group_size, symmetric, part_clip)
        parts.append((pack(codes(w[rows], scale, zero, group_size)), scale, zero))
    if len(parts) == 1:
        return PackedInt4(*parts[0], group_size, w.shape[1])
    packed, scales, zeros = zip(*parts)
    return PackedInt4(torch.cat(packed), torch.cat(scales), None if zeros[0] is None else torch.cat(zeros),
                      group_size, w.shape[1])


def from_codes(q: Tensor, scale: Tensor, zero: Optional[Tensor], group_size: int, k: int) -> PackedInt4:
    return PackedInt4(pack(q), scale, zero, group_size, k)


def fake_quantize(w: Tensor, group_size: int, symmetric: bool, clip: Union[float, Tensor] = 1.0) -> Tensor:
    """``w`` rounded to its INT4 grid and back, float32 ``[N, K]`` (for searches)."""
    scale, zero = scale_zero(w, group_size, symmetric, clip)
    return dequantize_codes(codes(w, scale, zero, group_size), scale, zero, group_size, w.shape[1])
