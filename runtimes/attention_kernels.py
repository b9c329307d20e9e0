"""The kernels each attention q-op can run on a GPU, as ``kernel_choice`` families, and their operands.

* ``attention_q8`` (8-bit attention): qcompile's fused Triton kernel. Its baseline is the
  floating-point attention it approximates, ``scaled_dot_product_attention`` on the same shapes
  (FlashAttention on a GPU), so a choice says how the 8-bit kernel measured against SDPA; the
  lowering runs SDPA instead where ``target="auto"`` let it choose and the kernel was slower.
* ``attention_quantized_kv`` (floating-point attention over a quantized KV cache): the Triton
  kernel that reads the codes tile by tile (split-KV for decode), and the q-op's own reference,
  the cache dequantized into one tensor then SDPA. Both compute the q-op, so the faster is kept.

An attention's speed depends on its lengths, which a compiled graph may leave dynamic, so the
call is measured at fixed points (``points``): the graph's own lengths where they are static,
else a 2048-token cache or prompt (and one query row for decode). The operands are fresh random
data of the call's batch, heads, head size, dtype, mask kind and cache format; ``m`` is the
number of query rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qcompiler.ir import attention, kv, kv_attention
from qcompiler.runtimes import triton_attention, triton_kv_attention
from qcompiler.runtimes.kernel_choice import Family, Kernel

LENGTH = 2048  # tokens of a cache or prompt whose length the graph leaves dynamic


def points(lq, lk) -> list:
    """``(query rows, keys)`` to measure a call at: its own where static (ints), else ``LENGTH``
    keys and, for a dynamic query length, both decode (1 row) and a prompt of ``LENGTH`` rows."""
    keys = lk if isinstance(lk, int) else LENGTH
    rows = [lq] if isinstance(lq, int) else [1, keys]
    return [(r, keys) for r in rows]


def _mask(kind: Optional[torch.dtype], b: int, lk: int, device) -> Optional[torch.Tensor]:
    """A mask of the call's kind over ``lk`` keys that attends everywhere, broadcast over rows."""
    if kind is None:
        return None
    if kind == torch.bool:
        return torch.ones(b, 1, 1, lk, dtype=torch.bool, device=device)
    return torch.zeros(b, 1, 1, lk, dtype=kind, device=device)


def _sdpa(q, k, v, mask, is_causal, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _fresh(shape, dtype, device):
    return torch.randn(*shape, device=device).to(dtype)


def _with_rows(a, m):
    """The call with a fresh query of ``m`` rows (the query is the first argument of both q-ops)."""
    q = a[0]
    return (_fresh((q.shape[0], q.shape[1], m, q.shape[3]), q.dtype, q.device), *a[1:])


# ----------------------------------------------------------------------------- attention_q8
# args: (q, k, v, attn_mask, is_causal, scale, qdtype)

def q8_args(b, hq, hkv, lq, lk, d, dtype, mask_kind, is_causal, scale, qdtype, device) -> tuple:
    """``attention_q8`` operands of these sizes (fresh random data)."""
    return (_fresh((b, hq, lq, d), dtype, device), _fresh((b, hkv, lk, d), dtype, device),
            _fresh((b, hkv, lk, d), dtype, device), _mask(mask_kind, b, lk, device), is_causal, scale, qdtype)


ATTENTION_Q8 = Family(
    "attention_q8",
    (Kernel("triton", lambda a, p: triton_attention.attention_q8(*a)),),
    reference=attention.attention_q8_ref,
    with_rows=_with_rows,
    shape=lambda a: (a[0].dtype, a[0].shape[0], a[0].shape[1], *a[1].shape[1:], None if a[3] is None else a[3].dtype,
                     a[4], a[5], a[6]),
    baseline=lambda a, m: (lambda q=_with_rows(a, m)[0]: _sdpa(q, a[1], a[2], a[3], a[4], a[5])),
    baseline_name="SDPA",
    where=lambda a, m: f"Lq={m}, Lk={a[1].shape[2]}",
)

# ----------------------------------------------------------------------------- attention_quantized_kv
# args: (q, k_codes, k_scale, k_offset, k_tail, v_codes, v_scale, v_offset, v_tail, attn_mask,
#        is_causal, scale, scheme, k_group, v_group)


def kv_args(b, hq, hkv, lq, lk, d, dtype, mask_kind, is_causal, scale, scheme, k_group, v_group, device) -> tuple:
    """``attention_quantized_kv`` operands over a cache of ``lk`` tokens: the whole blocks of
    ``k_group`` tokens as codes, the rest as the floating-point tail (as the cache keeps them)."""
    coded = lk - lk % k_group
    keys = kv.quantize(torch.randn(b, hkv, coded, d, device=device), scheme, "channel", k_group)
    values = kv.quantize(torch.randn(b, hkv, coded, d, device=device), scheme, "token", v_group)
    tail = (b, hkv, lk - coded, d)
    return (_fresh((b, hq, lq, d), dtype, device), keys.codes, keys.scale, keys.offset, _fresh(tail, dtype, device),
            values.codes, values.scale, values.offset, _fresh(tail, dtype, device), _mask(mask_kind, b, lk, device),
            is_causal, scale, scheme, k_group, v_group)


def _kv_sdpa(a, m):
    """SDPA over a floating-point cache of the same length: the attention before the cache was quantized."""
    q = _with_rows(a, m)[0]
    lk = a[1].shape[2] + a[4].shape[2]
    k = _fresh((q.shape[0], a[4].shape[1], lk, q.shape[3]), q.dtype, q.device)
    v = torch.randn_like(k)
    return lambda: _sdpa(q, k, v, a[9], a[10], a[11])


ATTENTION_QUANTIZED_KV = Family(
    "attention_quantized_kv",
    (Kernel("triton", lambda a, p: triton_kv_attention.attention_quantized_kv(*a)),
     Kernel("dequant_sdpa", lambda a, p: kv_attention.attention_quantized_kv_ref(*a))),
    reference=kv_attention.attention_quantized_kv_ref,
    with_rows=_with_rows,
    shape=lambda a: (a[0].dtype, a[0].shape[0], a[0].shape[1], a[4].shape[1], a[1].shape[2], a[4].shape[2],
                     a[0].shape[3], None if a[9] is None else a[9].dtype, *a[10:]),
    baseline=_kv_sdpa,
    baseline_name="SDPA over a floating-point cache",
    where=lambda a, m: f"Lq={m}, Lk={a[1].shape[2] + a[4].shape[2]}",
)

FAMILIES = {f.op: f for f in (ATTENTION_Q8, ATTENTION_QUANTIZED_KV)}
