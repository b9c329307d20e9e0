"""Floating-point attention over a quantized KV cache: the reference of ``qcompile::attention_quantized_kv``.

A ``QuantizedKVCache`` layer holds its oldest tokens as KIVI codes (``qcompiler.ir.kv``: keys per
channel in blocks of ``k_group`` tokens, values per token in groups of ``v_group`` channels) and its
newest as a floating-point tail. What a layer's attention reads is

    K = concat(dequantize(key codes), key tail)      V = concat(dequantize(value codes), value tail)
    O = softmax(Q K^T * scale + mask) V

with ``scaled_dot_product_attention``'s meaning of ``attn_mask`` (boolean, True = attend, or
additive), ``is_causal`` (top-left aligned) and ``scale`` (None: 1 / sqrt(head size)). K and V have
``Hkv`` heads; query head ``h`` reads head ``h // (Hq / Hkv)`` (GQA, MQA), as ``repeat_kv`` does.

This reference dequantizes into the tails' dtype, concatenates and calls
``scaled_dot_product_attention``: exactly what the cache's own dequantize-and-concatenate followed
by the model's attention computes. A fused kernel (``runtimes.triton_kv_attention``) reads the codes
tile by tile instead, so no floating-point copy of the cache is made.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompiler.ir import kv


def cache_tensor(codes: Tensor, scale: Tensor, offset: Optional[Tensor], tail: Tensor, scheme: str, per: str,
                 group: int) -> Tensor:
    """The cache's keys (``per="channel"``) or values (``per="token"``) as one tensor in the tail's dtype."""
    return torch.cat([kv.dequantize_codes(codes, scale, offset, scheme, per, group, tail.dtype), tail], dim=-2)


def attention_quantized_kv_ref(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_offset: Optional[Tensor],
                               k_tail: Tensor, v_codes: Tensor, v_scale: Tensor, v_offset: Optional[Tensor],
                               v_tail: Tensor, attn_mask: Optional[Tensor], is_causal: bool, scale: Optional[float],
                               scheme: str, k_group: int, v_group: int) -> Tensor:
    """``[B, Hq, Lq, D]`` in q's dtype (see the module docstring)."""
    k = cache_tensor(k_codes, k_scale, k_offset, k_tail, scheme, "channel", k_group)
    v = cache_tensor(v_codes, v_scale, v_offset, v_tail, scheme, "token", v_group)
    # enable_gqa reads each KV head for its query heads without repeating it in memory
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def check(q: Tensor, k_codes: Tensor, k_tail: Tensor, v_codes: Tensor, v_tail: Tensor, scheme: str,
          k_group: int, v_group: int) -> None:
    """``ValueError`` naming what does not fit (a kernel's precondition; the reference is SDPA's own)."""
    fmt = kv.kv_format(scheme)
    d = k_tail.shape[-1]
    width = d // 2 if fmt.bits == 4 else d
    if q.dim() != 4 or k_tail.dim() != 4 or v_tail.dim() != 4:
        raise ValueError("attention_quantized_kv takes [B, H, L, D] queries and cache tails")
    if q.shape[-1] != d or v_tail.shape[-1] != d or k_codes.shape[-1] != width or v_codes.shape[-1] != width:
        raise ValueError(f"attention_quantized_kv: query {tuple(q.shape)}, key codes {tuple(k_codes.shape)}, value "
                         f"codes {tuple(v_codes.shape)} and tails {tuple(k_tail.shape)} / {tuple(v_tail.shape)} do "
                         f"not share one head size")
    if q.shape[1] % k_tail.shape[1]:
        raise ValueError(f"attention_quantized_kv: {q.shape[1]} query heads are not a multiple of "
                         f"{k_tail.shape[1]} key heads")
    if k_codes.shape[-2] % k_group or d % v_group:
        raise ValueError(f"attention_quantized_kv: {k_codes.shape[-2]} quantized tokens are not whole key blocks "
                         f"of {k_group}, or head size {d} is not whole value groups of {v_group}")
