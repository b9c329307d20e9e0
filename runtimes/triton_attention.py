"""8-bit attention in Triton: ``qcompile::attention_q8`` as one fused flash-attention-style kernel.

Before the kernel, one launch quantizes its operands (``triton_attention_operands``): Q per
token, K minus its mean over tokens per token, and V per channel in V's own layout, the codes
the reference's. The kernel then takes a tile of query rows and walks the keys in tiles: the
INT8 product ``Qq Kq^T`` (int32 accumulator; INT8 for both formats, as the reference), the scales, the masks (causal,
boolean or additive, broadcast through zero strides), an online softmax in float32, ``P`` quantized
with one scale per row of the key tile (the tile is the reference's block of ``P_BLOCK`` keys), and
the 8-bit product ``Pq Vq`` (INT8, or FP8 E4M3) scaled and accumulated in float32; V's per-channel scales and the
normalizer are applied once at the end. Query head ``h`` reads key/value head ``h // (Hq / Hkv)`` (GQA, MQA): nothing is repeated in
memory, and no float copy of K or V is made beyond the smoothing pass.

Per score the kernel does as little besides the two products as it can (the ALU work is what the
tensor cores wait on: docs/results/sm90_attention_sass.md): scores are kept in base 2 (``log2 e``
folded into Q's scale, so an exponential is one ``exp2``); a row's largest ``P`` in a tile is
``exp2`` of its largest score (no second reduction); ``P``'s codes take one multiply by the
reciprocal of that maximum and a bit cast (no per-score division or float-to-integer conversion);
and the key tiles wholly inside the keys and before every row's causal limit are walked without
bounds or causal tests (the bulk loop), the rest with them (the edge loop).

A block's codes ``P / max(P over the block)`` do not depend on the row maximum the softmax
subtracts, so the kernel's codes are the reference's up to float32 rounding of ``exp`` and of
the reciprocal; results differ from the reference by that rounding (tested against float64 and
the reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.ir import attention, ops
from qcompiler.runtimes import triton_attention_operands, triton_quantize
from qcompiler.runtimes.triton_common import as_bytes

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2
LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in base 2: exp(x) = exp2(x * log2 e)


@triton.jit
def _p_codes(y, IS_FP8: tl.constexpr):
    """``P / scale`` in [0, QMAX] -> its 8-bit codes. INT8 rounds half to even by adding 1.5 * 2**23:
    the sum's low mantissa bits are the code, taken by a bit cast (no float-to-integer conversion,
    which issues at 1/8 of the multiply-add rate on sm_90)."""
    if IS_FP8:
        code = triton_quantize._round_to_e4m3(y).to(tl.float8e4nv)
    else:
        code = ((y + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
    return code


@triton.jit
def query_tile(HQ, GROUP, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch, query head, its KV head, query rows, head dims): grid axis 0 walks
    blocks of queries, axis 1 (batch, query head) pairs; ``GROUP`` query heads share a KV head."""
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    return b, h, h // GROUP, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)


@triton.jit
def softmax_step(s, m_i, l_i, rm, rn, END, LQ, LK, m_base, smm, smn, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                 CHECK: tl.constexpr = True):
    """One key tile of an online softmax in base 2: scores ``s`` (already times ``log2 e``: the
    callers fold it into their scale, so ``exp`` is one ``exp2``) of query rows ``rm`` (of ``LQ``)
    and keys ``rn`` (of ``LK``; from ``END`` on, padding) masked (causal; ``MASK`` 1: boolean,
    2: additive, read at ``m_base``, times ``log2 e`` too), then ``(p = 2^(s - new maximum) =
    e^(scores - their maximum), alpha = the rescale of earlier tiles, the new maximum, the new row
    sum, the largest p of each row)``. ``CHECK`` False: the caller knows every key of the tile is
    in range and before every row's causal limit, so neither is tested."""
    valid = rm[:, None] >= 0
    if CHECK:
        valid = valid & (rn[None, :] < END)
        if CAUSAL:
            valid = valid & (rn[None, :] <= rm[:, None])
    in_range = (rm[:, None] < LQ) & (rn[None, :] < LK)
    m_ptrs = m_base + rm[:, None].to(tl.int64) * smm + rn[None, :] * smn
    if MASK == 1:
        valid = valid & (tl.load(m_ptrs, mask=in_range, other=0) != 0)
    if MASK == 2:
        s += tl.load(m_ptrs, mask=in_range, other=0.0).to(tl.float32) * LOG2E
    if CHECK or MASK == 1:
        s = tl.where(valid, s, float("-inf"))
    tile_max = tl.max(s, 1)
    m_new = tl.maximum(m_i, tile_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    # exp2 is monotonic: the row's largest p is that of its largest score, without a second reduction
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1), tl.exp2(tile_max - m_safe)


@triton.jit
def _key_tile(qq, sq, m_i, l_i, acc, n0, b, hk, rm, rd, LQ, LK, HKV, k_base, ks_ptr, v_base, m_base, skn, svn, smm,
              smn, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP8: tl.constexpr,
              QMAX: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, CHECK: tl.constexpr):
    """Keys ``[n0, n0 + BLOCK_N)`` into the running maximum, sum and output (``CHECK``: the tile
    may reach past the keys or the causal limit, so loads and scores are masked)."""
    rn = n0 + tl.arange(0, BLOCK_N)
    if CHECK or BLOCK_D != D:
        kq = tl.load(k_base + rn[None, :].to(tl.int64) * skn + rd[:, None],
                     mask=(rn[None, :] < LK) & (rd[:, None] < D), other=0)
        vq = tl.load(v_base + rn[:, None].to(tl.int64) * svn + rd[None, :],
                     mask=(rn[:, None] < LK) & (rd[None, :] < D), other=0)
    else:
        kq = tl.load(k_base + rn[None, :].to(tl.int64) * skn + rd[:, None])
        vq = tl.load(v_base + rn[:, None].to(tl.int64) * svn + rd[None, :])
    if CHECK:
        sk = tl.load(ks_ptr + (b * HKV + hk).to(tl.int64) * LK + rn, mask=rn < LK, other=0.0)
    else:
        sk = tl.load(ks_ptr + (b * HKV + hk).to(tl.int64) * LK + rn)
    s = tl.dot(qq, kq, out_dtype=tl.int32).to(tl.float32) * sq[:, None] * sk[None, :]  # INT8 Q K^T
    p, alpha, m_new, l_i, p_max = softmax_step(s, m_i, l_i, rm, rn, LK, LQ, LK, m_base, smm, smn, MASK, CAUSAL,
                                               CHECK)
    ps = p_max / QMAX  # P's scale for this row and block of keys (the tile is the block)
    # P times QMAX / its maximum: one division per row, a multiply per score (the reference
    # divides each by the scale: a code can differ at an exact tie, by one)
    pq = _p_codes(p * (QMAX / tl.where(p_max > 0.0, p_max, QMAX))[:, None], IS_FP8)
    if IS_FP8:
        pv = tl.dot(pq, vq.to(tl.float8e4nv, bitcast=True))
    else:
        pv = tl.dot(pq, vq, out_dtype=tl.int32).to(tl.float32)
    return m_new, l_i, acc * alpha[:, None] + pv * ps[:, None]


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, mask_ptr, o_ptr,
                      LQ, LK, HQ, HKV, GROUP, sm_scale,
                      sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                      smb, smh, smm, smn, sob, soh, som,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      IS_FP8: tl.constexpr, QMAX: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr):
    b, h, hk, rm, rd = query_tile(HQ, GROUP, BLOCK_M, BLOCK_D)
    q_ptrs = q_ptr + b.to(tl.int64) * sqb + h * sqh + rm[:, None].to(tl.int64) * sqm + rd[None, :]
    qq = tl.load(q_ptrs, mask=(rm[:, None] < LQ) & (rd[None, :] < D), other=0)
    sq = tl.load(qs_ptr + (b * HQ + h).to(tl.int64) * LQ + rm, mask=rm < LQ, other=0.0) * (sm_scale * LOG2E)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_base = mask_ptr + b.to(tl.int64) * smb + h * smh
    k_base = k_ptr + b.to(tl.int64) * skb + hk * skh
    v_base = v_ptr + b.to(tl.int64) * svb + hk * svh
    end = LK
    full = LK - LK % BLOCK_N  # tiles before it hold only keys in range
    if CAUSAL:  # keys past the tile's last query row are masked for every row: skipped, not computed
        end = tl.minimum(LK, (tl.program_id(0) + 1) * BLOCK_M)
        # and keys before its first row are seen by every row: no causal test there
        full = tl.minimum(full, tl.program_id(0) * BLOCK_M - (tl.program_id(0) * BLOCK_M) % BLOCK_N)
    for n0 in range(0, full, BLOCK_N):
        m_i, l_i, acc = _key_tile(qq, sq, m_i, l_i, acc, n0, b, hk, rm, rd, LQ, LK, HKV, k_base, ks_ptr, v_base,
                                  m_base, skn, svn, smm, smn, D, BLOCK_N, BLOCK_D, IS_FP8, QMAX, MASK, CAUSAL, False)
    for n0 in range(full, end, BLOCK_N):
        m_i, l_i, acc = _key_tile(qq, sq, m_i, l_i, acc, n0, b, hk, rm, rd, LQ, LK, HKV, k_base, ks_ptr, v_base,
                                  m_base, skn, svn, smm, smn, D, BLOCK_N, BLOCK_D, IS_FP8, QMAX, MASK, CAUSAL, True)
    sv = tl.load(vs_ptr + (b * HKV + hk).to(tl.int64) * D + rd, mask=rd < D, other=0.0)
    out = acc * sv[None, :] / l_i[:, None]
    out = tl.where((l_i > 0.0)[:, None] | (l_i != l_i)[:, None], out, 0.0)  # every key masked: zeros
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h * soh + rm[:, None].to(tl.int64) * som + rd[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(rm[:, None] < LQ) & (rd[None, :] < D))


def query_tile_size(lq: int) -> tuple:
    """(query rows per program, warps): 16 for decode, 64 for short prompts, 128 rows on 8 warps
    for long ones (each K and V tile then feeds twice the rows)."""
    if lq <= 16:
        return 16, 4
    return (64, 4) if lq < 256 else (128, 8)


def _check(q: Tensor, k: Tensor, v: Tensor, qdtype) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention_q8 takes [B, H, L, D] query, key and value; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention_q8: query {tuple(q.shape)}, key {tuple(k.shape)} and value {tuple(v.shape)} "
                         f"do not fit (one head size for all three)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention_q8: {q.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    if qdtype not in ops.QMAXES:
        raise ValueError(f"attention_q8 takes int8 or float8_e4m3fn, got {qdtype}")


def attention_q8(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                 scale: Optional[float], qdtype: torch.dtype) -> Tensor:
    """The ``attention_q8`` q-op on the GPU (or the interpreter): ``[B, Hq, Lq, D]`` out, q's dtype."""
    _check(q, k, v, qdtype)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scale = attention.default_scale(d) if scale is None else scale
    # one launch: Q per token; K smoothed and per token; V per channel, in its own layout
    qq, sq, kq, sk, vq, sv = triton_attention_operands.quantize_operands(q, k, v, attention.QK_DTYPE, qdtype)
    out = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    if attn_mask is None:
        kind, mask, strides = MASK_NONE, sq, (0, 0, 0, 0)
    else:
        mask = attn_mask.expand(b, hq, lq, lk)
        if mask.dtype == torch.bool:
            kind, mask = MASK_BOOL, mask.to(torch.int8)
        else:
            kind, mask = MASK_ADD, mask.to(torch.float32)
        strides = mask.stride()
    if out.numel():
        block_m, warps = query_tile_size(lq)
        block_n = attention.P_BLOCK  # key tiles are P's scale blocks
        block_d = max(16, triton.next_power_of_2(d))
        grid = (triton.cdiv(lq, block_m), b * hq)
        _attention_kernel[grid](
            qq, kq, as_bytes(vq), sq.contiguous(), sk.contiguous(), sv.contiguous(), mask, out,
            lq, lk, hq, hkv, hq // hkv, float(scale),
            qq.stride(0), qq.stride(1), qq.stride(2), kq.stride(0), kq.stride(1), kq.stride(2),
            vq.stride(0), vq.stride(1), vq.stride(2), *strides, out.stride(0), out.stride(1), out.stride(2),
            D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IS_FP8=qdtype == ops.FP8,
            QMAX=ops.QMAXES[qdtype], MASK=kind, CAUSAL=bool(is_causal), num_warps=warps)
    return out
