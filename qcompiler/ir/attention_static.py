"""Static 8-bit attention: the plain-torch reference of ``qcompile::attention_q8_static``.

The form TensorRT's explicit quantization takes (QuantizeLinear/DequantizeLinear with constant
per-tensor scales on the inputs of the two batched MatMuls of attention): every scale is a
calibrated constant, nothing is measured at run time. It is what static-activation recipes
(``w8a8-smoothquant``, ``w8a8-static``, ``fp8-static``) run when ``attention`` is set; the
dynamic recipes run ``qcompile::attention_q8`` (``qcompiler.ir.attention``), whose per-token and
per-block scales are more accurate but have no constant-scale form.

``softmax(Q K^T * scale + mask) V``, in these steps:

1. **Calibrated smoothing of Q and K** (per head and channel, constants): ``Q' = Q * q_mul`` and
   ``K' = (K - k_shift) * k_mul`` with ``q_mul = s`` and ``k_mul = 1 / s`` on the query heads
   that read each key head, so ``Q' K'^T = Q K^T - Q k_shift^T``: the shift adds the same value to
   every score of a query row and cancels in the softmax (SageAttention's K smoothing with the
   calibration mean in place of the run-time mean), and ``s`` (SmoothQuant's migration, per head
   and channel) moves the channel outliers of rotary Q and K onto both operands equally.
2. **Q' and K' in INT8 per tensor** (``q_scale``, ``k_scale``), for both formats (the "fp8"
   format keeps Q K^T in INT8 as ``qcompiler.ir.attention`` does); the product ``Qq Kq^T`` is exact.
3. **Softmax in float32**, normalized (the mask and the causal mask as in ``attention_q8``); a
   row with every key masked gives zeros.
4. **P with a fixed scale** ``p_scale`` (``1 / qmax``: the largest probability is at most 1) and
   **V per tensor** (``v_scale``), in INT8 or FP8 E4M3; ``O = (Pq Vq) * p_scale * v_scale``.

INT8 codes cannot carry NaN (a cast maps it to a finite code): a NaN in a query, key or value row
or in the probabilities is carried past the codes into what it touches (``0 * sum`` of the row),
so NaN in gives NaN out, as in floating-point attention. TensorRT's form leaves this out (its INT8 Q/DQ maps NaN
to a code, as it does for every INT8 activation).

Key/value heads fewer than query heads (GQA, MQA) are read by ``Hq / Hkv`` query heads each. The
constants' shapes: ``q_mul`` ``[Hq, 1, D]``, ``k_shift`` and ``k_mul`` ``[Hkv, 1, D]``, the four
scales 0-d float32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler.ir.attention import QK_DTYPE, _repeat_heads, default_scale, score_mask
from qcompiler.ir.numerics import QMAXES, round_clamp


def p_scale_for(qdtype: torch.dtype) -> float:
    """The fixed scale of the probabilities: every probability lies in [0, 1]."""
    return 1.0 / QMAXES[qdtype]


def nan_carrier(a: Tensor, b: Tensor) -> Tensor:
    """``[..., M, 1] + [..., 1, N]`` zeros, NaN where row m of ``a`` or row n of ``b`` holds NaN (or Inf)."""
    return a.sum(-1, keepdim=True) * 0 + (b.sum(-1, keepdim=True) * 0).transpose(-1, -2)


def attention_q8_static(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                        scale: Optional[float], q_mul: Tensor, k_shift: Tensor, k_mul: Tensor, q_scale: Tensor,
                        k_scale: Tensor, v_scale: Tensor, p_scale: Tensor, qdtype: torch.dtype,
                        product_dtype: torch.dtype) -> Tensor:
    """The q-op's math with its two products in ``product_dtype`` (float64: exact, the reference;
    float32: what compiled targets run). ``scale`` None: 1 / sqrt(head size)."""
    pd, f32 = product_dtype, torch.float32
    scale = default_scale(q.shape[-1]) if scale is None else scale
    heads = q.shape[1]
    qs = q.to(f32) * q_mul.to(f32)
    ks = _repeat_heads((k.to(f32) - k_shift.to(f32)) * k_mul.to(f32), heads)
    qq = round_clamp(qs / q_scale, QK_DTYPE)
    kq = round_clamp(ks / k_scale, QK_DTYPE)
    scores = torch.matmul(qq.to(pd), kq.to(pd).transpose(-1, -2))
    scores = (scores * (q_scale.to(pd) * k_scale.to(pd) * scale)).to(f32) + nan_carrier(qs, ks)
    mask = score_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores + mask
    m = scores.amax(dim=-1, keepdim=True)
    live = torch.isfinite(m) | m.isnan()  # NaN rows stay NaN; rows with every key masked give zeros
    p = torch.softmax(torch.where(live, scores, torch.zeros_like(scores)), dim=-1)
    pq = round_clamp(p / p_scale, qdtype)
    vq = round_clamp(_repeat_heads(v.to(f32), heads) / v_scale, qdtype)
    out = torch.matmul(pq.to(pd), vq.to(pd)) * (p_scale.to(pd) * v_scale.to(pd))
    out = out + nan_carrier(p, _repeat_heads(v.to(f32), heads).transpose(-1, -2)).to(pd)
    out = torch.where(live, out, torch.zeros_like(out))
    return out.to(q.dtype)


def attention_q8_static_ref(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                            scale: Optional[float], q_mul: Tensor, k_shift: Tensor, k_mul: Tensor, q_scale: Tensor,
                            k_scale: Tensor, v_scale: Tensor, p_scale: Tensor, qdtype: torch.dtype) -> Tensor:
    """The reference (module docstring): exact products (float64), float32 softmax; q's dtype out."""
    return attention_q8_static(q, k, v, attn_mask, is_causal, scale, q_mul, k_shift, k_mul, q_scale, k_scale,
                               v_scale, p_scale, qdtype, torch.float64)
