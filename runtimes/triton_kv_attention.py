"""Floating-point attention over a quantized KV cache in Triton: ``qcompile::attention_quantized_kv`` as one kernel.

Flash-attention style: a program takes a tile of query rows of one head and walks the keys in
tiles, first the cache's quantized tokens, then its floating-point tail, with an online softmax in
float32. A quantized tile is dequantized where it is loaded: its codes (INT8, FP8 E4M3 bytes, or
two INT4 codes per byte, code ``2j`` in the low nibble) times their float16 scales (plus, for INT4,
offsets): keys one scale per (channel, block of ``k_group`` tokens), values one per (token, group
of ``v_group`` channels), the layout of ``qcompiler.ir.kv``. So the kernel reads the codes and
nothing else: no floating-point copy of the cache is made, and a decode step's memory traffic is
the codes' bytes (a quarter of float32's for INT8, an eighth for INT4, scales aside).

Both products take their operands in the query's dtype (float32 in IEEE precision, so a float32
model gets float32 attention, not TF32; float32 too in the CPU interpreter), accumulating in float32; query head ``h`` reads key/value
head ``h // (Hq / Hkv)`` (GQA, MQA). Masks, causality and fully masked rows as
``runtimes.triton_attention``; NaN passes through.

Decode (and any call whose query rows, times the query heads sharing a KV head, fit one 64-row
tile) takes the split-KV kernel instead (flash-decoding): a program per (batch, KV head, slice of
the keys) reads its slice once for every query head of its group, packed as the rows of one tile,
and writes an unnormalised partial output with its running maximum and sum; a second kernel merges
the slices. So a KV head's codes are read once, not once per query head, and a 2048-token cache
is walked by many programs instead of one per query head.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompiler.ir import kv, kv_attention
from qcompiler.ir.attention import default_scale
from qcompiler.runtimes import triton_tuning as tuning
from qcompiler.runtimes.triton_attention import LOG2E, MASK_ADD, MASK_BOOL, MASK_NONE, query_tile, softmax_step
from qcompiler.runtimes.triton_common import as_bytes, byte_to_f32, cast_rounded
from qcompiler.runtimes.triton_support import interpreting

FORMAT_CODES = {"int8": 0, "fp8": 1, "int4": 2}  # the kernel's FMT


@triton.jit
def _dequantized(c_base, s_base, o_base, tok, ch, valid, D: tl.constexpr, TOK_GROUP, CH_GROUP, SCALE_COLS,
                 FMT: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """The cache's values at tokens ``tok`` and channels ``ch`` (broadcast to one tile), float32."""
    # integer codes become floats by the mantissa trick (``byte_to_f32``), not by a quarter-rate
    # int-to-float conversion per element
    if FMT == 2:  # INT4: two codes per byte along the channels
        byte = tl.load(c_base + tok * (D // 2) + ch // 2, mask=valid, other=0).to(tl.int32)
        code = byte_to_f32((byte >> ((ch % 2) * 4)) & 15)
    elif FMT == 1:
        code = tl.load(c_base + tok * D + ch, mask=valid, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        code = byte_to_f32(tl.load(c_base + tok * D + ch, mask=valid, other=0).to(tl.int32) + 128) - 128.0
    at = (tok // TOK_GROUP) * SCALE_COLS + ch // CH_GROUP
    x = code * tl.load(s_base + at, mask=valid, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        x += tl.load(o_base + at, mask=valid, other=0.0).to(tl.float32)
    return x


@triton.jit
def _step(q, k, v, m_i, l_i, acc, rm, rn, END, LQ, LK, sm_scale, m_base, smm, smn,
          MASK: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """One key tile (``k`` ``[BLOCK_D, BLOCK_N]``, ``v`` ``[BLOCK_N, BLOCK_D]`` in the products' type, keys
    ``rn`` of ``LK``, those from ``END`` on padding) into the online softmax's running maximum, sum
    and output. Scores are kept in base 2 (``softmax_step``): the scale carries ``log2 e``."""
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee") * (sm_scale * LOG2E)
    else:
        s = tl.dot(q, k) * (sm_scale * LOG2E)
    p, alpha, m_new, l_i, _ = softmax_step(s, m_i, l_i, rm, rn, END, LQ, LK, m_base, smm, smn, MASK, CAUSAL)
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _walk_keys(q, m_i, l_i, acc, rm, start, end, b, hk, kc_ptr, ks_ptr, ko_ptr, kt_ptr, vc_ptr, vs_ptr, vo_ptr,
               vt_ptr, m_base, LQ, LC, LT, HKV, sm_scale, K_GROUP, V_GROUP, sktb, skth, sktn, svtb, svth, svtn,
               smm, smn, rd, D: tl.constexpr, BLOCK_N: tl.constexpr, FMT: tl.constexpr, HAS_OFFSET: tl.constexpr,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr):
    """Keys ``[start, end)`` of KV head ``hk`` into the online softmax: first the cache's quantized
    tokens, dequantized tile by tile, then its floating-point tail."""
    LK = LC + LT
    bh = (b * HKV + hk).to(tl.int64)
    width = D // 2 if FMT == 2 else D
    kc_base = kc_ptr + bh * LC * width
    k_scales = bh * (LC // K_GROUP) * D
    vc_base = vc_ptr + bh * LC * width
    v_scales = bh * LC * (D // V_GROUP)
    q_end = tl.minimum(end, LC)
    for n0 in range(start, q_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        k = _dequantized(kc_base, ks_ptr + k_scales, ko_ptr + k_scales, rn[None, :], rd[:, None],
                         (rn[None, :] < q_end) & (rd[:, None] < D), D, K_GROUP, 1, D, FMT, HAS_OFFSET)
        v = _dequantized(vc_base, vs_ptr + v_scales, vo_ptr + v_scales, rn[:, None], rd[None, :],
                         (rn[:, None] < q_end) & (rd[None, :] < D), D, 1, V_GROUP, D // V_GROUP, FMT, HAS_OFFSET)
        m_i, l_i, acc = _step(q, k.to(DOT), v.to(DOT), m_i, l_i, acc, rm, rn, q_end, LQ, LK, sm_scale, m_base,
                              smm, smn, MASK, CAUSAL, DOT == tl.float32)
    kt_base = kt_ptr + b.to(tl.int64) * sktb + hk * skth
    vt_base = vt_ptr + b.to(tl.int64) * svtb + hk * svth
    for t0 in range(tl.maximum(start, LC) - LC, end - LC, BLOCK_N):
        rt = t0 + tl.arange(0, BLOCK_N)
        k = tl.load(kt_base + rt[None, :].to(tl.int64) * sktn + rd[:, None],
                    mask=(rt[None, :] < end - LC) & (rd[:, None] < D), other=0.0)
        v = tl.load(vt_base + rt[:, None].to(tl.int64) * svtn + rd[None, :],
                    mask=(rt[:, None] < end - LC) & (rd[None, :] < D), other=0.0)
        m_i, l_i, acc = _step(q, k.to(DOT), v.to(DOT), m_i, l_i, acc, rm, LC + rt, end, LQ, LK, sm_scale, m_base,
                              smm, smn, MASK, CAUSAL, DOT == tl.float32)
    return m_i, l_i, acc


@triton.jit
def _kv_attention_kernel(q_ptr, kc_ptr, ks_ptr, ko_ptr, kt_ptr, vc_ptr, vs_ptr, vo_ptr, vt_ptr, mask_ptr, o_ptr,
                         LQ, LC, LT, HQ, HKV, GROUP, sm_scale, K_GROUP, V_GROUP,
                         sqb, sqh, sqm, sktb, skth, sktn, svtb, svth, svtn,
                         smb, smh, smm, smn, sob, soh, som,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         FMT: tl.constexpr, HAS_OFFSET: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                         DOT: tl.constexpr):
    b, h, hk, rm, rd = query_tile(HQ, GROUP, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h * sqh + rm[:, None].to(tl.int64) * sqm + rd[None, :],
                mask=(rm[:, None] < LQ) & (rd[None, :] < D), other=0.0).to(DOT)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_base = mask_ptr + b.to(tl.int64) * smb + h * smh
    end = LC + LT
    if CAUSAL:  # keys past the tile's last query row are masked for every row: skipped
        end = tl.minimum(end, (tl.program_id(0) + 1) * BLOCK_M)
    m_i, l_i, acc = _walk_keys(q, m_i, l_i, acc, rm, 0, end, b, hk, kc_ptr, ks_ptr, ko_ptr, kt_ptr, vc_ptr, vs_ptr,
                               vo_ptr, vt_ptr, m_base, LQ, LC, LT, HKV, sm_scale, K_GROUP, V_GROUP, sktb, skth, sktn,
                               svtb, svth, svtn, smm, smn, rd, D, BLOCK_N, FMT, HAS_OFFSET, MASK, CAUSAL, DOT)
    out = acc / l_i[:, None]
    out = tl.where((l_i > 0.0)[:, None] | (l_i != l_i)[:, None], out, 0.0)  # every key masked: zeros
    o_ptrs = o_ptr + b.to(tl.int64) * sob + h * soh + rm[:, None].to(tl.int64) * som + rd[None, :]
    tl.store(o_ptrs, cast_rounded(out, o_ptr.dtype.element_ty), mask=(rm[:, None] < LQ) & (rd[None, :] < D))


@triton.jit
def _kv_split_kernel(q_ptr, kc_ptr, ks_ptr, ko_ptr, kt_ptr, vc_ptr, vs_ptr, vo_ptr, vt_ptr, mask_ptr,
                     op_ptr, mp_ptr, lp_ptr, o_ptr,
                     LQ, LC, LT, HQ, HKV, GROUP, sm_scale, K_GROUP, V_GROUP, CHUNK, SPLITS,
                     sqb, sqh, sqm, sktb, skth, sktn, svtb, svth, svtn, smb, smh, smm, smn, sob, soh, som,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     FMT: tl.constexpr, HAS_OFFSET: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr,
                     DOT: tl.constexpr, DIRECT: tl.constexpr):
    """Keys ``[split * CHUNK, (split + 1) * CHUNK)`` of one KV head against all its query heads'
    rows (row ``r``: query head ``hk * GROUP + r // LQ``, query row ``r % LQ``): the partial output
    (not yet divided by the sum), maximum and sum of each row, float32; with ``DIRECT`` (a single
    slice: a short cache) the normalized output itself."""
    split = tl.program_id(0)
    b = tl.program_id(1) // HKV
    hk = tl.program_id(1) % HKV
    r = tl.arange(0, BLOCK_M)
    row_ok = r < GROUP * LQ
    h = hk * GROUP + tl.where(row_ok, r // LQ, 0)
    rm = tl.where(row_ok, r % LQ, LQ)  # padding rows: past the last query, never stored
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b.to(tl.int64) * sqb + h[:, None].to(tl.int64) * sqh + rm[:, None].to(tl.int64) * sqm
                + rd[None, :], mask=row_ok[:, None] & (rd[None, :] < D), other=0.0).to(DOT)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_base = mask_ptr + b.to(tl.int64) * smb + h[:, None].to(tl.int64) * smh  # a base per row (its head)
    start = split * CHUNK
    m_i, l_i, acc = _walk_keys(q, m_i, l_i, acc, rm, start, tl.minimum(start + CHUNK, LC + LT), b, hk, kc_ptr, ks_ptr,
                               ko_ptr, kt_ptr, vc_ptr, vs_ptr, vo_ptr, vt_ptr, m_base, LQ, LC, LT, HKV, sm_scale,
                               K_GROUP, V_GROUP, sktb, skth, sktn, svtb, svth, svtn, smm, smn, rd, D, BLOCK_N, FMT,
                               HAS_OFFSET, MASK, CAUSAL, DOT)
    if DIRECT:  # one slice: the output itself, no merge launch
        out = acc / l_i[:, None]
        out = tl.where((l_i > 0.0)[:, None] | (l_i != l_i)[:, None], out, 0.0)  # every key masked: zeros
        o_ptrs = (o_ptr + b.to(tl.int64) * sob + h[:, None].to(tl.int64) * soh + rm[:, None].to(tl.int64) * som
                  + rd[None, :])
        tl.store(o_ptrs, cast_rounded(out, o_ptr.dtype.element_ty), mask=row_ok[:, None] & (rd[None, :] < D))
    else:
        row = ((b * HQ + h).to(tl.int64) * LQ + rm) * SPLITS + split
        tl.store(op_ptr + row[:, None] * BLOCK_D + rd[None, :], acc, mask=row_ok[:, None])
        tl.store(mp_ptr + row, m_i, mask=row_ok)
        tl.store(lp_ptr + row, l_i, mask=row_ok)


@triton.jit
def _kv_merge_kernel(op_ptr, mp_ptr, lp_ptr, o_ptr, HQ, LQ, SPLITS, sob, soh, som,
                     D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query row: its slices' partial outputs rescaled to the overall maximum and divided by
    the overall sum; a row whose every key was masked is zeros; NaN passes through."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (HQ * LQ)
    h = (row // LQ) % HQ
    i = row % LQ
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    s_ok = rs < SPLITS
    m_s = tl.load(mp_ptr + row * SPLITS + rs, mask=s_ok, other=float("-inf"))
    l_s = tl.load(lp_ptr + row * SPLITS + rs, mask=s_ok, other=0.0)
    m = tl.max(m_s, 0)
    m = tl.where(m_s != m_s, m_s, m)  # (a NaN maximum stays NaN)
    w = tl.where(m_s == float("-inf"), 0.0, tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m)))  # base-2 maxima
    o_s = tl.load(op_ptr + (row * SPLITS + rs)[:, None] * BLOCK_D + rd[None, :], mask=s_ok[:, None], other=0.0)
    l = tl.sum(w * l_s, 0)
    out = tl.sum(w[:, None] * o_s, 0) / l
    out = tl.where((l > 0.0) | (l != l), out, 0.0)
    tl.store(o_ptr + b * sob + h * soh + i * som + rd, cast_rounded(out, o_ptr.dtype.element_ty), mask=rd < D)


SPLIT_ROWS = 64  # query rows x query heads per KV head up to which a call takes the split-KV kernel


def splits_for(lk: int, programs: int, block_n: int, sm_count: int) -> int:
    """Slices of the keys: enough programs for two waves over the SMs, each slice at least one tile."""
    return max(1, min(triton.cdiv(lk, block_n), triton.cdiv(2 * sm_count, max(programs, 1))))


def _dot_dtype(dtype: torch.dtype):
    """The products' operand type: the query's, but float32 in Triton's CPU interpreter, whose
    bfloat16 (numpy has none) does not survive ``tl.dot``."""
    if dtype == torch.float32 or interpreting():
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _mask_argument(attn_mask: Optional[Tensor], shape: tuple, like: Tensor) -> tuple:
    """(kind, tensor, strides) of the kernel's mask arguments."""
    if attn_mask is None:
        return MASK_NONE, like, (0, 0, 0, 0)
    mask = attn_mask.expand(shape)
    kind, mask = (MASK_BOOL, mask.to(torch.int8)) if mask.dtype == torch.bool else (MASK_ADD, mask.to(torch.float32))
    return kind, mask, mask.stride()


def attention_quantized_kv(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_offset: Optional[Tensor], k_tail: Tensor,
                           v_codes: Tensor, v_scale: Tensor, v_offset: Optional[Tensor], v_tail: Tensor,
                           attn_mask: Optional[Tensor], is_causal: bool, scale: Optional[float], scheme: str,
                           k_group: int, v_group: int) -> Tensor:
    """The ``attention_quantized_kv`` q-op on the GPU (or the interpreter): ``[B, Hq, Lq, D]`` in q's dtype."""
    return attention_split(q, k_codes, k_scale, k_offset, k_tail, v_codes, v_scale, v_offset, v_tail, attn_mask,
                           is_causal, scale, scheme, k_group, v_group)


def attention_split(q, k_codes, k_scale, k_offset, k_tail, v_codes, v_scale, v_offset, v_tail, attn_mask, is_causal,
                    scale, scheme, k_group, v_group, splits: Optional[int] = None) -> Tensor:
    """``attention_quantized_kv`` with the key slices of the split-KV kernel chosen (``splits``;
    None: by the GPU's size). Calls with more than ``SPLIT_ROWS`` query rows per KV head take the
    one-pass kernel whatever ``splits`` says."""
    kv_attention.check(q, k_codes, k_tail, v_codes, v_tail, scheme, k_group, v_group)
    fmt = kv.kv_format(scheme)
    b, hq, lq, d = q.shape
    hkv, lc, lt = k_tail.shape[1], k_codes.shape[-2], k_tail.shape[-2]
    scale = default_scale(d) if scale is None else scale
    out = torch.empty((b, hq, lq, d), dtype=q.dtype, device=q.device)
    if not out.numel():
        return out
    q = q.contiguous() if q.stride(-1) != 1 else q
    k_tail, v_tail = (t.to(q.dtype) if t.stride(-1) == 1 else t.to(q.dtype).contiguous() for t in (k_tail, v_tail))
    codes = [as_bytes(c.contiguous()) if fmt.name == "fp8" else c.contiguous() for c in (k_codes, v_codes)]
    scales = [s.contiguous() for s in (k_scale, v_scale)]
    offsets = [s if o is None else o.contiguous() for o, s in ((k_offset, scales[0]), (v_offset, scales[1]))]
    kind, mask, strides = _mask_argument(attn_mask, (b, hq, lq, lc + lt), q)
    block_n = 64 if d <= 64 else 32
    block_d = max(16, triton.next_power_of_2(d))
    group = hq // hkv
    if lq * group <= SPLIT_ROWS:  # decode: the split-KV kernel and its merge
        n_split = splits or splits_for(lc + lt, b * hkv, block_n, tuning.sm_count(q.device))
        chunk = triton.cdiv(triton.cdiv(lc + lt, n_split), block_n) * block_n
        n_split = max(1, triton.cdiv(lc + lt, chunk))
        direct = n_split == 1
        part = torch.empty((b, hq, lq, n_split, block_d) if not direct else (1,), dtype=torch.float32,
                           device=q.device)
        m_part = torch.empty((b, hq, lq, n_split) if not direct else (1,), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        _kv_split_kernel[(n_split, b * hkv)](
            q, codes[0], scales[0], offsets[0], k_tail, codes[1], scales[1], offsets[1], v_tail, mask,
            part, m_part, l_part, out, lq, lc, lt, hq, hkv, group, float(scale), k_group, v_group, chunk, n_split,
            q.stride(0), q.stride(1), q.stride(2), k_tail.stride(0), k_tail.stride(1), k_tail.stride(2),
            v_tail.stride(0), v_tail.stride(1), v_tail.stride(2), *strides, out.stride(0), out.stride(1),
            out.stride(2), D=d, BLOCK_M=max(16, triton.next_power_of_2(lq * group)), BLOCK_N=block_n,
            BLOCK_D=block_d, FMT=FORMAT_CODES[fmt.name], HAS_OFFSET=not fmt.symmetric, MASK=kind,
            CAUSAL=bool(is_causal), DOT=_dot_dtype(q.dtype), DIRECT=direct)
        if not direct:
            _kv_merge_kernel[(b * hq * lq,)](part, m_part, l_part, out, hq, lq, n_split, out.stride(0),
                                             out.stride(1), out.stride(2), D=d,
                                             BLOCK_S=max(2, triton.next_power_of_2(n_split)), BLOCK_D=block_d)
        return out
    block_m = 16 if lq <= 16 else 64
    grid = (triton.cdiv(lq, block_m), b * hq)
    _kv_attention_kernel[grid](
        q, codes[0], scales[0], offsets[0], k_tail, codes[1], scales[1], offsets[1], v_tail, mask, out,
        lq, lc, lt, hq, hkv, hq // hkv, float(scale), k_group, v_group,
        q.stride(0), q.stride(1), q.stride(2), k_tail.stride(0), k_tail.stride(1), k_tail.stride(2),
        v_tail.stride(0), v_tail.stride(1), v_tail.stride(2), *strides, out.stride(0), out.stride(1), out.stride(2),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        FMT=FORMAT_CODES[fmt.name], HAS_OFFSET=not fmt.symmetric, MASK=kind, CAUSAL=bool(is_causal),
        DOT=_dot_dtype(q.dtype))
    return out
