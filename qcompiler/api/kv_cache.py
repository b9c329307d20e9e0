"""``QuantizedKVCache``: a transformers ``Cache`` whose keys and values are stored quantized (KIVI).

    cache = qcompiler.QuantizedKVCache(model.config, scheme="int8")        # or "fp8", "int4"
    out = model.generate(**prompt, past_key_values=cache, max_new_tokens=64)
    print(cache.nbytes)

Keys are quantized per channel in blocks of ``group_size`` tokens and values per token in groups
of ``group_size`` channels (``qcompiler.ir.kv``); the most recent tokens stay in floating point:
between ``residual`` and ``residual + group_size - 1`` of them, because keys are quantized in
whole blocks. New tokens are returned exactly to the step that computed them; later steps read
them quantized. Layers with a sliding window keep transformers' own floating-point window (its
memory is bounded by the window).

What attention reads. In eager mode each layer's update dequantizes its cache into one
floating-point tensor for that layer's attention call only (the codes are read once and written
once in the model's dtype); that tensor is a view of a workspace the cache's layers share (it holds
one layer, and layer i's attention has read it before layer i + 1 updates), so a decode step
allocates nothing that grows with the context. Compiled, the read is a ``qcompile::kv_dequantize``
q-op and a concatenation, which the attention pass fuses with the floating-point attention that
reads them into ``qcompile::attention_quantized_kv``: the ``triton`` target runs it as one kernel
that dequantizes the codes tile by tile (no floating-point copy of the layer's cache at all);
Inductor and ONNX Runtime run it as a fused dequantize-and-concatenate (one layer's float copy)
followed by their attention. Quantized attention (``attention="int8"``) reads that copy too.
No float copy of the whole cache is ever kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from qcompiler.errors import MissingDependency, OptionError
from qcompiler.ir import kv, ops  # noqa: F401  (ops defines torch.ops.qcompile)
from qcompiler.recipe_specs import DEFAULT_KV_RESIDUAL, KVCache

try:
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, DynamicLayer, get_layer_types_and_kwargs
except ImportError:  # transformers missing, or one without per-layer caches (< 4.56)
    Cache = DynamicLayer = None

FULL_ATTENTION = "full_attention"


def _require_transformers() -> None:
    if Cache is None:
        raise MissingDependency("qcompiler.QuantizedKVCache is a transformers Cache and needs transformers >= 4.56 "
                                "(per-layer caches): pip install -U transformers")


def check_options(scheme: str, group_size: Optional[int], residual: int) -> int:
    """The group size to use; ``OptionError`` naming the fix for an unknown scheme or a bad size
    (the checks and defaults of a recipe's ``kv_cache`` fields)."""
    if scheme is None:
        raise OptionError(f"unknown KV-cache scheme None; valid schemes: {sorted(kv.KV_FORMATS)}")
    return KVCache(scheme, group_size, residual).group


class Workspace:
    """Two flat float buffers (keys, values) that layers dequantize into, shared by the layers of
    one cache: layer i's attention has read them before layer i + 1 updates. They grow to the
    largest layer's need, so a decode step allocates nothing that grows with the context."""

    def __init__(self):
        self.buffers = [None, None]

    def take(self, which: int, shape: tuple, like: Tensor) -> Tensor:
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        buf = self.buffers[which]
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, numel * 5 // 4), dtype=like.dtype, device=like.device)  # room to grow
            self.buffers[which] = buf
        return buf[:numel].view(shape)


_Base = DynamicLayer if DynamicLayer is not None else object


class QuantizedKVLayer(_Base):
    """One attention layer's cache: quantized keys and values, then a floating-point tail
    (``self.keys`` / ``self.values``, as transformers' ``DynamicLayer`` keeps them)."""

    is_croppable = False

    def __init__(self, scheme: str = "int8", group_size: Optional[int] = None, residual: int = DEFAULT_KV_RESIDUAL,
                 workspace: Optional[Workspace] = None):
        _require_transformers()
        super().__init__()
        self.workspace = workspace if workspace is not None else Workspace()
        self.scheme = scheme
        self.group = check_options(scheme, group_size, residual)
        self.residual = residual
        self.qkeys: Optional[kv.QuantizedKV] = None
        self.qvalues: Optional[kv.QuantizedKV] = None

    def __repr__(self):
        return f"QuantizedKVLayer({self.scheme}, group={self.group}, residual={self.residual})"

    @property
    def quantized_length(self) -> int:
        return 0 if self.qkeys is None else self.qkeys.length

    def get_seq_length(self) -> int:
        tail = self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0
        return self.quantized_length + tail

    def _read(self, which: int, quantized: Optional[kv.QuantizedKV], tail: Tensor) -> Tensor:
        """The dequantized codes followed by the floating-point tail, as one tensor (in eager mode
        a view of the shared workspace, valid until the next layer's update)."""
        if quantized is None:
            return tail
        if torch.compiler.is_compiling():  # one q-op the attention pass can fuse into the attention
            codes = torch.ops.qcompile.kv_dequantize(quantized.codes, quantized.scale, quantized.offset,
                                                     quantized.fmt.name, quantized.per, quantized.group, tail.dtype)
            return torch.cat([codes, tail], dim=-2)
        b, h, n, d = tail.shape
        out = self.workspace.take(which, (b, h, quantized.length + n, d), tail)
        kv.dequantize(quantized, tail.dtype, out=out[..., :quantized.length, :])
        out[..., quantized.length:, :] = tail
        return out

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[-1] % 2 and self.scheme == "int4":
            raise OptionError(f"the int4 KV cache packs two codes per byte; head size {key_states.shape[-1]} is odd: "
                              f"use scheme='int8' or 'fp8'")
        has_tail = self.keys.dim() == 4
        tail_k = torch.cat([self.keys, key_states], dim=-2) if has_tail else key_states
        tail_v = torch.cat([self.values, value_states], dim=-2) if has_tail else value_states
        keys, values = self._read(0, self.qkeys, tail_k), self._read(1, self.qvalues, tail_v)
        flush = (tail_k.shape[-2] - self.residual) // self.group * self.group
        if flush > 0:  # the oldest whole blocks of the tail become codes
            qk = kv.quantize(tail_k[..., :flush, :], self.scheme, "channel", self.group)
            qv = kv.quantize(tail_v[..., :flush, :], self.scheme, "token", self.group)
            self.qkeys = qk if self.qkeys is None else self.qkeys.cat(qk)
            self.qvalues = qv if self.qvalues is None else self.qvalues.cat(qv)
            tail_k, tail_v = tail_k[..., flush:, :].clone(), tail_v[..., flush:, :].clone()
        self.keys, self.values = tail_k, tail_v
        return keys, values

    @property
    def nbytes(self) -> int:
        tail = sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        return tail + sum(q.nbytes for q in (self.qkeys, self.qvalues) if q is not None)

    @property
    def quantized_nbytes(self) -> int:
        return sum(q.nbytes for q in (self.qkeys, self.qvalues) if q is not None)

    # beam search and its relatives reorder, select and repeat batch rows
    def _index_batch(self, index: Tensor) -> None:
        if self.qkeys is not None:
            self.qkeys, self.qvalues = self.qkeys.index_batch(index), self.qvalues.index_batch(index)
        if self.is_initialized and self.keys.dim() == 4:
            self.keys = self.keys.index_select(0, index.to(self.keys.device))
            self.values = self.values.index_select(0, index.to(self.values.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._index_batch(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._index_batch(torch.as_tensor(indices).reshape(-1))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            rows = self.keys.shape[0] if self.keys.dim() == 4 else self.qkeys.codes.shape[0]
            self._index_batch(torch.arange(rows).repeat_interleave(repeats))

    def reset(self) -> None:
        super().reset()
        self.qkeys = self.qvalues = None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (assisted decoding): use the float cache")


class QuantizedKVCache(Cache if Cache is not None else object):
    """A transformers ``Cache`` for ``model.config``: every full-attention layer a ``QuantizedKVLayer``.

    Args:
        config: the model's transformers config (its text config is read for the layer types).
        scheme: "int8", "fp8" (E4M3) or "int4" (asymmetric, KIVI).
        group_size: tokens per key scale and channels per value scale (default 64 for 8-bit, 32 for INT4).
        residual: how many of the most recent tokens stay in floating point (at least; see
            ``qcompiler.api.kv_cache``).
    """

    def __init__(self, config, scheme: str = "int8", group_size: Optional[int] = None,
                 residual: int = DEFAULT_KV_RESIDUAL):
        _require_transformers()
        self.scheme = scheme
        self.group = check_options(scheme, group_size, residual)
        self.residual = residual
        text = config.get_text_config(decoder=True)
        layer_types, kwargs = get_layer_types_and_kwargs(text)
        workspace = Workspace()
        layers = [QuantizedKVLayer(scheme, self.group, residual, workspace) if t == FULL_ATTENTION
                  else DYNAMIC_LAYER_TYPE_MAPPING[t](**kw) for t, kw in zip(layer_types, kwargs)]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now: codes, scales, offsets and every floating-point tensor."""
        return sum(layer.nbytes if isinstance(layer, QuantizedKVLayer) else
                   sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                   for layer in self.layers)

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the quantized part only (codes, scales and offsets)."""
        return sum(layer.quantized_nbytes for layer in self.layers if isinstance(layer, QuantizedKVLayer))

    @classmethod
    def from_cache(cls, cache, config, scheme: str = "int8", group_size: Optional[int] = None,
                   residual: int = DEFAULT_KV_RESIDUAL) -> "QuantizedKVCache":
        """A quantized cache holding what ``cache`` (a transformers ``DynamicCache``) holds: its
        full-attention layers' keys and values go through the quantized layers (all but the last
        ``residual``-odd tokens quantized); sliding-window layers are taken over as they are."""
        new = cls(config, scheme, group_size, residual)
        for i, layer in enumerate(cache.layers[:len(new.layers)]):
            if not isinstance(new.layers[i], QuantizedKVLayer):
                new.layers[i] = layer
            elif layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4 and layer.keys.numel():
                new.layers[i].update(layer.keys, layer.values)
        return new

    def quantized_tokens(self) -> int:
        """Tokens stored quantized, summed over layers and batch rows (for bytes per token)."""
        return sum(layer.qkeys.codes.shape[0] * layer.quantized_length for layer in self.layers
                   if isinstance(layer, QuantizedKVLayer) and layer.qkeys is not None)


def float_bytes_per_token(config, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one token takes in a floating-point cache of every layer, for comparisons."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * torch.empty((), dtype=dtype).element_size()


HOOK = "_qcompile_kv_cache_hook"  # the model's attribute: (settings, the forward pre-hook's handle)


def attach(model, scheme: str, group_size: Optional[int], residual: int) -> None:
    """Make ``model`` (a transformers model) run with a ``QuantizedKVCache`` of this scheme: a
    forward pre-hook turns the ``DynamicCache`` that ``generate()`` passes into a quantized one
    (quantizing what it already holds) the first time it sees it; the model returns that cache,
    and ``generate()`` passes it back on every later step. A cache the caller made (a
    ``QuantizedKVCache``, a ``StaticCache``) is left as it is."""
    _require_transformers()
    from transformers import DynamicCache

    group = check_options(scheme, group_size, residual)
    settings = (scheme, group, residual)
    current = model.__dict__.get(HOOK)
    if current is not None and current[0] == settings:
        return
    if current is not None:
        current[1].remove()

    def quantize_cache(module, args, kwargs):
        for key in ("cache", "past_key_values"):
            cache = kwargs.get(key)
            if type(cache) is DynamicCache:
                kwargs[key] = QuantizedKVCache.from_cache(cache, module.config, *settings)
        return args, kwargs

    model.__dict__[HOOK] = (settings, model.register_forward_pre_hook(quantize_cache, with_kwargs=True))


def attached(model) -> Optional[tuple]:
    """``(scheme, group size, residual)`` of the KV cache ``attach`` gave ``model``, or None."""
    current = getattr(model, "__dict__", {}).get(HOOK)
    return None if current is None else current[0]

