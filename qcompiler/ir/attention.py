"""Quantized attention: the plain-torch reference of ``qcompile::attention_q8`` (P V in INT8 or FP8 E4M3).

``softmax(Q K^T * scale + mask) V`` with both products on 8-bit operands (SageAttention's recipe):

1. **K smoothing**: K minus its mean over tokens, per (batch, head, channel). It shifts every
   score of a query row by the same ``q . mean`` and so cancels in the softmax, while it removes
   the channel offsets that would otherwise spend the key's 8-bit range.
2. **Q and K per token, in INT8 for both formats**: one scale per row (per batch, head and token),
   ``amax / 127``; the product ``Qq Kq^T`` is exact (``qcompiler.ir.ops`` conventions), then
   scaled by ``sq * sk * scale``. FP8's 3-bit mantissa on Q and K distorted SmolLM2's next-token
   distributions 9x more than INT8 did (docs/experiments.md, "8-bit attention"), as SageAttention2
   found: its FP8 attention keeps INT8 (or INT4) for Q K^T and FP8 for P V, which is what the
   "fp8" format means here (Hopper runs both at the same rate).
3. **Softmax in float32**: the mask (boolean, True = attend, or additive) and the causal mask
   (top-left aligned, as ``scaled_dot_product_attention`` takes ``is_causal``) are applied; with
   the row maximum ``m``, ``P = exp(S - m)`` lies in [0, 1] and ``l`` is its row sum.
4. **P per block of keys**: one scale per (query row, block of ``P_BLOCK`` = 64 consecutive keys),
   the block's maximum of ``P`` over qmax; **V per channel** (one scale per batch, head and
   channel, over tokens). A fixed scale ``1 / qmax`` for the whole row (every row's maximum is 1)
   rounds the many small probabilities of a long context to zero: on SmolLM2-135M it distorted the
   next-token distributions 10x more than per-block scales (docs/experiments.md, "8-bit attention").
   Blocks of 64 keys are a fused kernel's key tiles, where the block maximum costs one reduction.
5. ``O = sum over blocks of (Pq_b Vq_b) * sp_b, times sv / l``: the normalizer is the float32
   ``l`` (what a fused kernel accumulates). A row with no key to attend gets zeros.

Query heads that outnumber key/value heads (GQA, MQA) read key/value head ``h // (Hq / Hkv)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler.ir.numerics import QMAXES, quantize_rows, round_clamp


def default_scale(head_dim: int) -> float:
    return head_dim ** -0.5


def _repeat_heads(t: Tensor, heads: int) -> Tensor:
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def smooth_keys(k: Tensor) -> Tensor:
    return k - k.mean(dim=-2, keepdim=True)


def quantize_values(v: Tensor, qdtype: torch.dtype) -> tuple:
    """V ``[B, H, L, Dv]`` -> (codes, float32 scale ``[B, H, 1, Dv]``), per channel over tokens."""
    q, s = quantize_rows(v.transpose(-1, -2), qdtype)
    return q.transpose(-1, -2), s.transpose(-1, -2)


P_BLOCK = 64  # keys per P scale (a fused kernel's key tile)
QK_DTYPE = torch.int8  # Q and K's format whatever the P V format (module docstring, step 2)


def quantize_probabilities(p: Tensor, qdtype: torch.dtype) -> tuple:
    """``P`` ``[..., Lq, Lk]`` in [0, 1] -> (codes ``[..., Lq, nb, P_BLOCK]`` in [0, qmax], float32
    scales ``[..., Lq, nb]``): per row and block of ``P_BLOCK`` keys, the block's maximum over qmax
    (keys past ``Lk`` are zero padding; an all-zero block gets scale 0 and codes 0)."""
    n = p.shape[-1]
    blocks = torch.nn.functional.pad(p, (0, -n % P_BLOCK)).reshape(*p.shape[:-1], -1, P_BLOCK)
    scale = blocks.amax(dim=-1, keepdim=True) / QMAXES[qdtype]
    codes = round_clamp(blocks / torch.where(scale > 0, scale, torch.ones_like(scale)), qdtype)
    return codes, scale.squeeze(-1)


def block_product(pq: Tensor, ps: Tensor, vq: Tensor, product_dtype: torch.dtype) -> Tensor:
    """``sum_b (Pq_b @ Vq_b) * sp_b``: codes ``[..., Lq, nb, P_BLOCK]``, scales ``[..., Lq, nb]``,
    V codes ``[..., Lk, D]`` (padded to the blocks here) -> ``[..., Lq, D]``."""
    n, d = vq.shape[-2], vq.shape[-1]
    v = torch.nn.functional.pad(vq.to(product_dtype), (0, 0, 0, -n % P_BLOCK))
    v = v.reshape(*vq.shape[:-2], -1, P_BLOCK, d)
    per_block = torch.einsum("...qbk,...bkd->...qbd", pq.to(product_dtype), v)
    return (per_block * ps.to(product_dtype).unsqueeze(-1)).sum(dim=-2)


def score_mask(attn_mask: Optional[Tensor], is_causal: bool, lq: int, lk: int, device) -> Optional[Tensor]:
    """An additive float32 mask (0 or -inf, or the user's values) broadcastable to the scores."""
    mask = None
    if attn_mask is not None:
        mask = (torch.zeros(attn_mask.shape, dtype=torch.float32, device=device)
                .masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                else attn_mask.to(torch.float32))
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=device).tril()
        causal = torch.zeros(lq, lk, device=device).masked_fill(~causal, float("-inf"))
        mask = causal if mask is None else mask + causal
    return mask


def attention_q8_ref(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                     scale: Optional[float], qdtype: torch.dtype) -> Tensor:
    """The reference (see the module docstring): exact products (float64), float32 softmax; q's dtype out."""
    return attention_q8(q, k, v, attn_mask, is_causal, scale, qdtype, torch.float64)


def attention_q8(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                 scale: Optional[float], qdtype: torch.dtype, product_dtype: torch.dtype) -> Tensor:
    """The q-op's math with its two products in ``product_dtype``: float64 is exact (the reference);
    float32 is exact for Q K^T up to head size 1024 and rounds P V over longer contexts only by
    float32 accumulation (what compiled targets run). ``scale`` None: 1 / sqrt(head size)."""
    pd = product_dtype
    scale = default_scale(q.shape[-1]) if scale is None else scale
    heads = q.shape[1]
    k = smooth_keys(_repeat_heads(k, heads).to(torch.float32))
    v = _repeat_heads(v, heads).to(torch.float32)
    qq, sq = quantize_rows(q, QK_DTYPE)
    kq, sk = quantize_rows(k, QK_DTYPE)
    scores = torch.matmul(qq.to(pd), kq.to(pd).transpose(-1, -2))
    scores = (scores * sq.to(pd) * sk.to(pd).transpose(-1, -2) * scale).to(torch.float32)
    mask = score_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores + mask
    m = scores.amax(dim=-1, keepdim=True)
    live = torch.isfinite(m) | m.isnan()  # NaN rows stay NaN; rows with every key masked give zeros
    p = torch.exp(scores - torch.where(live, m, torch.zeros_like(m)))
    l = p.sum(dim=-1, keepdim=True)
    vq, sv = quantize_values(v, qdtype)
    pq, ps = quantize_probabilities(p, qdtype)
    out = block_product(pq, ps, vq, pd) * sv.to(pd) / l.to(pd)
    out = torch.where(live, out, torch.zeros_like(out))
    return out.to(q.dtype)
