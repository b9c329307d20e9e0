"""torch's built-in INT4 weight-only GEMM (tinygemm: ``aten._weight_int4pack_mm``) on qcompile's INT4 layout.

tinygemm is the kernel behind gpt-fast's and torchao's INT4 weight-only decode: bf16 activations,
groups of 32 to 256, tensor-core tiles over a weight it packs once (``_convert_weight_to_int4pack``)
into its own interleaved layout. It dequantizes a code ``q`` as ``(q - 8) * scale + zero`` with
bf16 ``scale`` and ``zero`` stored together as ``[K / group, N, 2]``. qcompile's weight is
``(u - z) * s`` (``qcompiler.ir.int4``), which is the same value with ``scale = s`` and
``zero = (8 - z) * s``: both are rounded to bf16 once, here, which is the only numerical
difference from the reference (its float32 scales; a relative error of a few 1e-3, the order of
the bf16 rounding of the dequantized weight that the reference does too).

``prepare`` runs once per weight, when the triton lowering builds a graph that picked this kernel;
``linear`` runs per call. ``can_run`` says when the kernel takes a weight, and why not.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler import torch_compat

GROUPS = (32, 64, 128, 256)


def inner_k_tiles(k: int) -> int:
    """The deepest tile interleave tinygemm allows for this K (it needs K % (16 * tiles) == 0)."""
    return next((t for t in (8, 4, 2) if k % (16 * t) == 0), 0)


def can_run(dtype: torch.dtype, device: torch.device, n: int, k: int, k_packed: int, group_size: int) -> tuple:
    """``(ok, reason)``: whether tinygemm takes this linear (``k_packed``: K after padding to whole groups)."""
    if device.type != "cuda":
        return False, "tinygemm runs on CUDA devices"
    if dtype != torch.bfloat16:
        return False, f"tinygemm takes bfloat16 activations, not {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return False, "tinygemm needs compute capability 8.0 or newer"
    if group_size not in GROUPS:
        return False, f"tinygemm takes groups of {GROUPS}, not {group_size}"
    if k_packed != k:
        return False, f"K={k} is not a whole number of {group_size}-groups (tinygemm has no padding)"
    if n % 8 or not inner_k_tiles(k):
        return False, f"tinygemm needs N % 8 == 0 and K % 32 == 0 (N={n}, K={k})"
    return True, ""


def scales_and_zeros(scale: Tensor, zero: Optional[Tensor]) -> Tensor:
    """qcompile's ``scale`` / ``zero`` ``[N, G]`` -> tinygemm's bf16 ``[G, N, 2]`` (module docstring)."""
    s = scale.to(torch.float32)
    z = torch.full_like(s, 8.0) if zero is None else zero.to(torch.float32)
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def tinygemm_codes(packed: Tensor) -> Tensor:
    """qcompile's bytes (low nibble = even column) -> the uint8 ``[N, K / 2]`` tinygemm's converter
    reads on CUDA (high nibble = even column)."""
    return ((packed & 0x0F) << 4) | (packed >> 4)


def prepare(packed: Tensor, scale: Tensor, zero: Optional[Tensor]) -> tuple:
    """``(weight, scales_and_zeros)`` in tinygemm's layouts, made once per weight."""
    k = packed.shape[1] * 2
    weight = torch_compat.convert_weight_to_int4pack(tinygemm_codes(packed).contiguous(), inner_k_tiles(k))
    return weight, scales_and_zeros(scale, zero)


def linear(x: Tensor, weight: Tensor, sz: Tensor, group_size: int, n: int, smooth_inv: Optional[Tensor],
           bias: Optional[Tensor]) -> Tensor:
    """``linear_w4a16`` on tinygemm's prepared weight: x ``[..., K]`` bf16 -> ``[..., N]``."""
    x2 = x.reshape(-1, x.shape[-1])
    if smooth_inv is not None:
        x2 = x2 * smooth_inv.to(x.dtype)
    y = torch_compat.weight_int4pack_mm(x2.contiguous(), weight, group_size, sz)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], n)


def dequantized(packed: Tensor, sz: Tensor, group_size: int) -> Tensor:
    """The float32 weight ``[N, K]`` tinygemm computes with: ``(u - 8) * scale + zero`` from the bf16
    pair. What the tests compare with the reference's weight (no CUDA needed)."""
    n = packed.shape[0]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, -1).to(torch.float32)
    s = sz[..., 0].to(torch.float32).t().repeat_interleave(group_size, dim=1)
    z = sz[..., 1].to(torch.float32).t().repeat_interleave(group_size, dim=1)
    return (codes - 8.0) * s + z
