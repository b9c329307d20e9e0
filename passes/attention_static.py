"""Static 8-bit attention's constants, made from calibration statistics.

For a static-activation recipe with ``attention`` set, each attention runs as
``qcompile::attention_q8_static`` (``qcompiler.ir.attention_static``), whose smoothing vectors and
per-tensor scales are made here once from the module's ``AttentionStats``:

* ``k_shift``: K's calibration mean per head and channel (it cancels in the softmax);
* ``s = sqrt(|Q|max / |K - k_shift|max)`` per key head and rotary pair of channels (SmoothQuant's
  migration strength 0.5 over the query heads that read the key head): ``q_mul = s``,
  ``k_mul = 1 / s``, which leave ``Q K^T`` unchanged and give both operands the same range
  ``sqrt(|Q|max |K - k_shift|max)``. Rotary embeddings rotate channel ``i`` with channel
  ``i + D/2`` (transformers' ``rotate_half``) by an angle that grows with the position, so at
  positions calibration did not reach a slow pair's range moves from one channel to the other: a
  factor per channel calibrated on 512-token windows clipped SmolLM2's Q and K at 2048 tokens
  (median attention SQNR 19.6 dB against 28.4 dB with one factor per pair; docs/experiments.md);
* ``q_scale`` / ``k_scale``: that range's maximum over heads and channels, over 127 (INT8);
  ``v_scale``: V's absolute maximum over qmax; ``p_scale``: ``1 / qmax``.

The attention's statistics are found by the module name the graph gives its node, which after a
graph break inside a submodule is relative to that submodule, and which may carry a prefix of
the frame's own: the one recorded name equal to it up to such a prefix on either side is taken.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from qcompiler.calibration.state import linked_state
from qcompiler.calibration.stats import AttentionStats
from qcompiler.ir.attention import QK_DTYPE
from qcompiler.ir.attention_static import p_scale_for
from qcompiler.ir.numerics import scale_from_amax

MIGRATION = 0.5
_TINY = 1e-6  # channel ranges below this (dead channels) are not smoothed


@dataclass(frozen=True)
class StaticAttention:
    """The constants of one ``attention_q8_static`` call, in its argument order."""

    q_mul: Tensor      # [Hq, 1, D]
    k_shift: Tensor    # [Hk, 1, D]
    k_mul: Tensor      # [Hk, 1, D]
    q_scale: Tensor    # 0-d float32
    k_scale: Tensor
    v_scale: Tensor
    p_scale: Tensor

    def tensors(self) -> tuple:
        return (self.q_mul, self.k_shift, self.k_mul, self.q_scale, self.k_scale, self.v_scale, self.p_scale)


def regrouped(stats: AttentionStats, kv_heads: int) -> AttentionStats:
    """``stats`` for a graph whose key/value heads number ``kv_heads``: transformers repeats GQA's
    key/value heads before the attention call in some paths and not in others (``enable_gqa``),
    so calibration and a compiled graph may see the same heads once or repeated."""
    hk = stats.k_sum.shape[0]
    if kv_heads == hk:
        return stats
    if kv_heads % hk == 0:  # the graph repeats heads calibration saw once
        r = kv_heads // hk
        rep = lambda t: t.repeat_interleave(r, dim=0)  # noqa: E731
        return AttentionStats(stats.module, stats.q_absmax, rep(stats.k_min), rep(stats.k_max), rep(stats.k_sum),
                              rep(stats.v_absmax), stats.tokens)
    r = hk // kv_heads  # calibration saw repeated copies (identical) of the graph's heads
    grouped = lambda t: t.reshape(kv_heads, r, *t.shape[1:])  # noqa: E731
    return AttentionStats(stats.module, stats.q_absmax, grouped(stats.k_min).amin(1), grouped(stats.k_max).amax(1),
                          grouped(stats.k_sum).mean(1), grouped(stats.v_absmax).amax(1), stats.tokens)


def fits(stats: AttentionStats, q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``stats`` describe an attention on these query/key/value shapes (heads repeated or not)."""
    hq, hk = q.shape[1], k.shape[1]
    cal_hk = stats.k_sum.shape[0]
    return (tuple(stats.q_absmax.shape) == (hq, q.shape[-1]) and stats.k_sum.shape[1] == k.shape[-1]
            and stats.v_absmax.shape[1] == v.shape[-1] and hq % hk == 0 and (hk % cal_hk == 0 or cal_hk % hk == 0))


def constants(stats: AttentionStats, qdtype: torch.dtype, migration: float = MIGRATION,
              rotary_pairs: bool = True) -> StaticAttention:
    """``StaticAttention`` from one module's statistics (module docstring; ``rotary_pairs=False``:
    a smoothing factor per channel, for experiments)."""
    hq, hk = stats.q_absmax.shape[0], stats.k_sum.shape[0]
    group = hq // hk
    shift = (stats.k_sum / max(stats.tokens, 1)).to(torch.float32)
    k_range = torch.maximum((stats.k_max - shift).abs(), (stats.k_min - shift).abs())          # [Hk, D]
    q_range = stats.q_absmax.reshape(hk, group, -1).amax(dim=1)                                # [Hk, D]
    if rotary_pairs:
        k_range, q_range = _per_rotary_pair(k_range), _per_rotary_pair(q_range)
    live = (q_range > _TINY) & (k_range > _TINY)
    s = torch.where(live, q_range.clamp_min(_TINY) ** -migration * k_range.clamp_min(_TINY) ** migration,
                    torch.ones_like(q_range))
    q_mul = s.repeat_interleave(group, dim=0)
    q_amax = (stats.q_absmax * q_mul).amax()
    k_amax = (k_range / s).amax()
    return StaticAttention(
        q_mul.unsqueeze(1).contiguous(), shift.unsqueeze(1).contiguous(), (1 / s).unsqueeze(1).contiguous(),
        scale_from_amax(q_amax, QK_DTYPE), scale_from_amax(k_amax, QK_DTYPE),
        scale_from_amax(stats.v_absmax.amax(), qdtype), torch.tensor(p_scale_for(qdtype), dtype=torch.float32))


def _per_rotary_pair(r: Tensor) -> Tensor:
    """``[..., D]`` ranges -> the larger of channels ``i`` and ``i + D/2`` in both (odd D: as given)."""
    d = r.shape[-1]
    if d % 2:
        return r
    m = torch.maximum(r[..., : d // 2], r[..., d // 2:])
    return torch.cat([m, m], dim=-1)


def model_state(params):
    """The ``QuantState`` of the model whose parameters ``params`` (an iterable) are, or None."""
    for p in params:
        state, _ = linked_state(p)
        if state is not None:
            return state
    return None


def find_stats(state, module: str) -> Optional[AttentionStats]:
    """``module``'s attention statistics: its exact name, else the only recorded name that ends in
    it or that it ends in (at a dot)."""
    if state is None:
        return None
    if module in state.attention:
        return state.attention[module]
    found = [s for name, s in state.attention.items()
             if name.endswith("." + module) or (name and module.endswith("." + name))]
    return found[0] if len(found) == 1 else None
