"""What calibration records at a linear's input (``ActivationStats``) and at an attention's
inputs (``AttentionStats``), and what a weight algorithm leaves for the quantize pass
(``PreparedWeight``): the records a model's ``QuantState`` holds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

DEFAULT_ROWS = 1024


@dataclass
class ActivationStats:
    """What calibration saw at one linear layer's input."""

    module: str
    channel_absmax: Tensor                 # [K] float32, over every calibration token
    rows: Tensor                           # [<=max_rows, K] float32, a uniform sample of tokens
    tokens: int = 0
    max_rows: int = DEFAULT_ROWS
    _gen: torch.Generator = field(default=None, repr=False)
    # results of searches over these statistics (e.g. SmoothQuant alpha), so recompiles for
    # new shapes or grad modes do not search again; a new calibration brings new statistics
    searches: dict = field(default_factory=dict, repr=False)

    @classmethod
    def empty(cls, module: str, k: int, max_rows: int) -> "ActivationStats":
        gen = torch.Generator().manual_seed(0)
        return cls(module, torch.zeros(k), torch.empty(0, k), 0, max_rows, gen)

    def to(self, device) -> "ActivationStats":
        """The same statistics with their tensors on ``device`` (searches stay shared)."""
        return dataclasses.replace(self, channel_absmax=self.channel_absmax.to(device), rows=self.rows.to(device),
                                   searches=self.searches)

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float32)
        self.channel_absmax = torch.maximum(self.channel_absmax, x.abs().amax(dim=0))
        # reservoir sampling: every token seen so far is kept with equal probability
        n = x.shape[0]
        take = max(0, min(n, self.max_rows - self.rows.shape[0]))
        if take:
            self.rows = torch.cat([self.rows, x[:take]])
        if take < n:
            seen = self.tokens + take + torch.arange(n - take)
            slot = (torch.rand(n - take, generator=self._gen) * (seen + 1)).long()
            keep = slot < self.max_rows
            self.rows[slot[keep]] = x[take:][keep]
        self.tokens += n


@dataclass
class AttentionStats:
    """What calibration saw at the inputs of one module's ``scaled_dot_product_attention``
    (``[B, H, L, D]`` query, key and value; statistics per head and channel, float32 except the
    key sum, float64): what static 8-bit attention's constants are made from."""

    module: str
    q_absmax: Tensor                       # [Hq, D]
    k_min: Tensor                          # [Hk, D]
    k_max: Tensor                          # [Hk, D]
    k_sum: Tensor                          # [Hk, D] float64
    v_absmax: Tensor                       # [Hk, Dv]
    tokens: int = 0                        # key rows summed per head

    TENSORS = ("q_absmax", "k_min", "k_max", "k_sum", "v_absmax")

    @classmethod
    def empty(cls, module: str, q: Tensor, k: Tensor, v: Tensor) -> "AttentionStats":
        hq, d, hk, dv = q.shape[1], q.shape[-1], k.shape[1], v.shape[-1]
        return cls(module, torch.zeros(hq, d), torch.full((hk, d), float("inf")), torch.full((hk, d), -float("inf")),
                   torch.zeros(hk, d, dtype=torch.float64), torch.zeros(hk, dv), 0)

    def fits(self, q: Tensor, k: Tensor, v: Tensor) -> bool:
        return (tuple(self.q_absmax.shape) == (q.shape[1], q.shape[-1]) and tuple(self.k_sum.shape) ==
                (k.shape[1], k.shape[-1]) and tuple(self.v_absmax.shape) == (v.shape[1], v.shape[-1]))

    def update(self, q: Tensor, k: Tensor, v: Tensor) -> None:
        def per_head(x: Tensor) -> Tensor:  # [B, H, L, D] -> [H, B * L, D] float32 on the CPU
            return x.detach().to("cpu", torch.float32).transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])

        q, k, v = per_head(q), per_head(k), per_head(v)
        self.q_absmax = torch.maximum(self.q_absmax, q.abs().amax(dim=1))
        self.k_min = torch.minimum(self.k_min, k.amin(dim=1))
        self.k_max = torch.maximum(self.k_max, k.amax(dim=1))
        self.k_sum = self.k_sum + k.to(torch.float64).sum(dim=1)
        self.v_absmax = torch.maximum(self.v_absmax, v.abs().amax(dim=1))
        self.tokens += k.shape[1]

    def tensors(self) -> dict:
        return {name: getattr(self, name) for name in self.TENSORS}


@dataclass(frozen=True)
class PreparedWeight:
    """A linear's weight as a calibration-time algorithm left it for the quantize pass.

    ``recipe`` is what the layer gets (None: floating point, with ``reason``); ``weight`` the
    rounded weight in its packed form (None when the quantize pass rounds it itself);
    ``smooth_scale`` the per-input-channel scale s that the weight absorbed (AWQ), so the
    layer's input must be divided by it; ``key`` the recipe fields the weight was made for.

    ``trained``: the weight (and ``x_scale``, a static activation scale) came from quantization-aware
    training (``qcompiler.qat.convert``); its key is then the recipe's ``trained_key``, ``weight``
    is the scheme's own form (a ``PackedInt4``, or a ``PerChannelWeight`` for 8-bit weights), and
    the quantize pass takes it as it is, whatever the recipe's rounding algorithm.
    """

    recipe: object
    key: tuple
    weight: object = None
    smooth_scale: Optional[Tensor] = None
    reason: str = ""
    sensitivity: dict = field(default_factory=dict)    # format -> relative output error
    trained: bool = False
    x_scale: Optional[Tensor] = None
