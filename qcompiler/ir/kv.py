"""KV-cache quantization: KIVI's layout (keys per channel, values per token) and its plain-torch math.

A cache tensor is ``[B, H, L, D]`` (batch, KV heads, tokens, head size). It is quantized in
groups of ``group`` elements, each with its own scale (and, for INT4, its own offset):

* **keys per channel**: one scale per (head, channel, block of ``group`` consecutive tokens), so
  the outlier channels that keys carry (KIVI, KVQuant) get scales of their own. ``L`` must be a
  multiple of ``group``: the cache only quantizes whole blocks and keeps the rest in floating point.
* **values per token**: one scale per (head, token, block of ``group`` consecutive channels).

Formats (``KV_FORMATS``): ``int8`` and ``fp8`` (E4M3) are symmetric (``x ~= q * scale``,
``scale = amax / qmax``); ``int4`` is asymmetric as in KIVI (``x ~= u * scale + offset``,
``u`` in [0, 15], ``offset`` the group's minimum), two codes per byte along ``D``, code ``2j`` in
the low nibble. Scales and offsets are stored as float16: 2 bytes per group, so INT8 keys and
values of head size 64 at group 32 take 68 bytes per token and head against 256 in float32.
The quantize step uses the stored (float16) scale, so dequantizing reverses exactly what was
rounded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qcompiler.ir.numerics import FP8, QMAX, QMIN

SCALE_DTYPE = torch.float16
# float16's smallest subnormal and largest finite value: a stored scale stays inside them
_SCALE_MIN, _SCALE_MAX = 2.0 ** -24, 65504.0
PER = ("channel", "token")  # keys, values


@dataclass(frozen=True)
class KVFormat:
    """One KV number format: how many bits a value takes, its code dtype and range."""

    name: str
    bits: int
    code_dtype: torch.dtype
    qmax: float               # the code that the group's amax (symmetric) or range (asymmetric) maps to
    symmetric: bool


KV_FORMATS = {
    "int8": KVFormat("int8", 8, torch.int8, float(QMAX), True),
    "fp8": KVFormat("fp8", 8, FP8, float(torch.finfo(FP8).max), True),
    "int4": KVFormat("int4", 4, torch.uint8, 15.0, False),
}


def kv_format(name: str) -> KVFormat:
    try:
        return KV_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown KV-cache scheme {name!r}; valid schemes: {sorted(KV_FORMATS)}") from None


def channel_group(head_dim: int, group: int) -> int:
    """The group along the head dimension (values): ``group``, or the largest divisor of
    ``head_dim`` below it (head size 80 at group 32: 16). Euclid's steps written out, not
    ``math.gcd``: a symbolic head size (``dynamic=True``) goes through them as guards, where
    ``math.gcd`` would break the graph."""
    a, b = group, head_dim
    while b:
        a, b = b, a % b
    return a


@dataclass(frozen=True)
class QuantizedKV:
    """Quantized keys or values of ``length`` tokens (see the module docstring).

    ``codes``: ``[B, H, L, D]`` (INT4: uint8 ``[B, H, L, D / 2]``); ``scale`` / ``offset``: float16,
    ``[B, H, L / group, D]`` for keys (``per="channel"``), ``[B, H, L, D / group]`` for values.
    """

    codes: Tensor
    scale: Tensor
    offset: Optional[Tensor]
    fmt: KVFormat
    per: str
    group: int

    @property
    def length(self) -> int:
        return self.codes.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)

    def cat(self, other: "QuantizedKV") -> "QuantizedKV":
        """These tokens followed by ``other``'s (same format and grouping)."""
        offset = None if self.offset is None else torch.cat([self.offset, other.offset], dim=-2)
        return QuantizedKV(torch.cat([self.codes, other.codes], dim=-2), torch.cat([self.scale, other.scale], dim=-2),
                           offset, self.fmt, self.per, self.group)

    def index_batch(self, index: Tensor) -> "QuantizedKV":
        """The batch rows ``index`` (beam search reorders, selects and repeats them)."""
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return QuantizedKV(pick(self.codes), pick(self.scale), pick(self.offset), self.fmt, self.per, self.group)


def _block_shape(shape, per: str, group: int) -> tuple:
    """``[B, H, L, D]`` -> blocks whose reduction axis is -2 (keys: tokens) or -1 (values: channels)."""
    b, h, length, d = shape
    return (b, h, length // group, group, d) if per == "channel" else (b, h, length, d // group, group)


def _grouped(x: Tensor, per: str, group: int) -> Tensor:
    return x.reshape(_block_shape(x.shape, per, group))


def _stored_scale(value: Tensor) -> Tensor:
    return value.clamp(_SCALE_MIN, _SCALE_MAX).to(SCALE_DTYPE)


def _pack4(u: Tensor) -> Tensor:
    # int32 arithmetic, not uint8 shifts: an ONNX export of the cache's compiled update stays in ops
    # ONNX Runtime's CPU kernels take
    return (u[..., 0::2].to(torch.int32) + u[..., 1::2].to(torch.int32) * 16).to(torch.uint8)


def _unpack4(packed: Tensor) -> Tensor:
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        # int32 arithmetic in traced graphs: an ONNX export then stays in ops ONNX Runtime's CPU
        # kernels take (its BitShift and a uint8 stack did not type-check), and Inductor fuses it
        p = packed.to(torch.int32)
        return torch.stack([p % 16, p // 16], dim=-1).flatten(-2).to(torch.uint8)
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # eager: uint8 bit operations, fast


def quantize(x: Tensor, scheme: str, per: str, group: int) -> QuantizedKV:
    """Keys (``per="channel"``, ``L`` a multiple of ``group``) or values (``per="token"``) -> codes."""
    fmt = kv_format(scheme)
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    b, h, length, d = x.shape
    group = group if per == "channel" else channel_group(d, group)
    if per == "channel" and length % group:
        raise ValueError(f"keys are quantized in whole blocks of {group} tokens; got {length} tokens")
    if fmt.bits == 4 and d % 2:
        raise ValueError(f"INT4 packs two codes per byte along the head size; head size {d} is odd")
    blocks = _grouped(x.to(torch.float32), per, group)
    axis = -2 if per == "channel" else -1
    if fmt.symmetric:
        scale = _stored_scale(blocks.abs().amax(dim=axis, keepdim=True) / fmt.qmax)
        y = blocks / scale.to(torch.float32)
        if fmt.code_dtype == torch.int8:
            codes = torch.clamp(torch.round(y), QMIN, QMAX).to(torch.int8)
        else:
            codes = torch.clamp(y, -fmt.qmax, fmt.qmax).to(fmt.code_dtype)
        offset = None
    else:
        low, high = blocks.amin(dim=axis, keepdim=True), blocks.amax(dim=axis, keepdim=True)
        scale = _stored_scale((high - low) / fmt.qmax)
        offset = low.to(SCALE_DTYPE)
        u = torch.round((blocks - offset.to(torch.float32)) / scale.to(torch.float32)).clamp(0.0, fmt.qmax)
        codes = u.to(torch.uint8)
    codes = codes.reshape(b, h, length, d)
    if fmt.bits == 4:
        codes = _pack4(codes)
    squeeze = lambda t: None if t is None else t.squeeze(axis)  # noqa: E731
    return QuantizedKV(codes, squeeze(scale), squeeze(offset), fmt, per, group)


def dequantize_codes(codes: Tensor, scale: Tensor, offset: Optional[Tensor], scheme: str, per: str, group: int,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``QuantizedKV``'s fields -> ``[B, H, L, D]`` in ``dtype``, with no in-place write: the math
    of the ``qcompile::kv_dequantize`` q-op, which compiled graphs trace."""
    fmt = kv_format(scheme)
    codes = _unpack4(codes) if fmt.bits == 4 else codes
    b, h, length, d = codes.shape
    axis = -2 if per == "channel" else -1
    y = _grouped(codes, per, group).to(torch.float32) * scale.to(torch.float32).unsqueeze(axis)
    if offset is not None:
        y = y + offset.to(torch.float32).unsqueeze(axis)
    return y.reshape(b, h, length, d).to(dtype).contiguous()  # a q-op's result is contiguous, as its fake


def dequantize(q: QuantizedKV, dtype: torch.dtype = torch.float32, out: Optional[Tensor] = None) -> Tensor:
    """``[B, H, L, D]`` in ``dtype``, written into ``out`` (a view of that shape) when given: the
    cache dequantizes straight into the tensor attention reads, without a float copy of its own."""
    if out is None:
        out = torch.empty((*q.codes.shape[:-1], q.codes.shape[-1] * (2 if q.fmt.bits == 4 else 1)), dtype=dtype,
                          device=q.codes.device)
    if q.fmt.code_dtype == torch.int8 and out.dtype == torch.float32 and not torch.compiler.is_compiling():
        # one pass, int8 codes in, float32 out (a slice of a larger buffer splits into blocks as a view)
        blocks = _grouped(q.codes, q.per, q.group)
        scale = q.scale.to(torch.float32).unsqueeze(-2 if q.per == "channel" else -1)
        torch.mul(blocks, scale, out=out.view(_block_shape(out.shape, q.per, q.group)))
        return out
    out.copy_(dequantize_codes(q.codes, q.scale, q.offset, q.fmt.name, q.per, q.group))
    return out


def reference_dequantize(q: QuantizedKV) -> Tensor:
    """Float64 ``[B, H, L, D]`` straight from the definition (the oracle ``dequantize`` is tested against)."""
    codes = (_unpack4(q.codes) if q.fmt.bits == 4 else q.codes).to(torch.float64)
    if q.per == "channel":
        scale = q.scale.to(torch.float64).repeat_interleave(q.group, dim=-2)
        offset = None if q.offset is None else q.offset.to(torch.float64).repeat_interleave(q.group, dim=-2)
    else:
        scale = q.scale.to(torch.float64).repeat_interleave(q.group, dim=-1)
        offset = None if q.offset is None else q.offset.to(torch.float64).repeat_interleave(q.group, dim=-1)
    return codes * scale + (0.0 if offset is None else offset)


def bytes_per_token(scheme: str, head_dim: int, group: int) -> float:
    """Bytes one token of one KV head takes in the quantized part (keys and values, scales and
    offsets included), for ``head_dim`` and ``group``."""
    fmt = kv_format(scheme)
    code = head_dim * fmt.bits / 8
    per_group = SCALE_DTYPE.itemsize * (1 if fmt.symmetric else 2)
    keys = code + per_group * head_dim / group
    values = code + per_group * head_dim / channel_group(head_dim, group)
    return keys + values
