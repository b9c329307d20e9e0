"""The ort form's attention rewrite (``lowering.onnx_attention_cache``): a decoder's head splits,
RoPE and cache ``Concat`` around a 4-D ``Attention`` become the 3-D op with the past keys and values
as its inputs (heads repeated for a mask, a sliding window's crop), computing what the 4-D graph
computes (bit for bit in ONNX Runtime) and matching float64; a causal mask over a past, or a head
split read elsewhere, keeps the 4-D graph."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import rel_err
from qcompiler.lowering import onnx_fusions
from qcompiler.lowering.onnx import to_onnx
from qcompiler.lowering.onnx_attention_cache import fold_attention_heads
from qcompiler.runtimes.ort_session import OrtSession
from test_onnx_rotary import Rope


class CachedAttention(nn.Module):
    """transformers' attention step over a KV cache: heads split from 3-D projections, RoPE on q
    and k, the past prepended, SDPA (grouped heads), heads merged back."""

    def __init__(self, heads: int, kv_heads: int, head: int, causal: bool = False, rope: bool = True,
                 leak: bool = False):
        super().__init__()
        self.heads, self.kv_heads, self.causal, self.leak = heads, kv_heads, causal, leak
        self.rope = Rope(head) if rope else None

    def split(self, q, k, v, past_k, past_v, position_ids):
        batch, seq, _ = q.shape
        q, k, v = (x.view(batch, seq, h, -1).transpose(1, 2)
                   for x, h in ((q, self.heads), (k, self.kv_heads), (v, self.kv_heads)))
        if self.rope is not None:
            q, k = self.rope(q, k, position_ids)
        return q, torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)

    def merge(self, y, q):
        out = y.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return out + q.sum() if self.leak else out  # leak: a head split read by something else as well

    def forward(self, q, k, v, past_k, past_v, position_ids):
        q, k, v = self.split(q, k, v, past_k, past_v, position_ids)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=self.heads != self.kv_heads)
        return self.merge(y, q), k, v


class MaskedAttention(CachedAttention):
    """transformers' path when a mask is given: the key and value heads repeated for the query
    heads in the graph (``repeat_kv``), a boolean mask (left padding); with ``window``, the cache
    returned cropped to its last ``window`` positions."""

    window = None

    def forward(self, q, k, v, past_k, past_v, position_ids, mask):
        q, k, v = self.split(q, k, v, past_k, past_v, position_ids)
        batch, kv_heads, total, head = k.shape
        groups = self.heads // kv_heads

        def repeat(x):
            return x[:, :, None].expand(batch, kv_heads, groups, total, head).reshape(batch, kv_heads * groups, total, head)

        # a sliding window's cache keeps the last ``window`` positions, cropped before attention runs
        kept = (k, v) if self.window is None else (k[:, :, -self.window:], v[:, :, -self.window:])
        y = F.scaled_dot_product_attention(q, repeat(k), repeat(v), attn_mask=mask)
        return self.merge(y, q), *kept


def _inputs(batch, heads, kv_heads, head, seq, past, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = [torch.randn(batch, seq, h * head, generator=g) for h in (heads, kv_heads, kv_heads)]
    cache = [torch.randn(batch, kv_heads, past, head, generator=g) for _ in range(2)]
    positions = past + torch.arange(seq).repeat(batch, 1)
    return (*flat, *cache, positions)


def _float64(model: CachedAttention, inputs):
    with torch.no_grad():
        return model.double()(*[x.double() if x.is_floating_point() else x for x in inputs])


def _export(model, example, fold: bool = True):
    """A decode step's graph as Dynamo gives it: one new token, the past's length dynamic."""
    fusions = onnx_fusions.GRAPH_FUSIONS["ort"]
    kept = [f for f in fusions if fold or f is not fold_attention_heads]
    past = torch.export.Dim("past")
    shapes = (None, None, None, {2: past}, {2: past}, None) + (({3: past + 1},) if len(example) > 6 else ())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(onnx_fusions.GRAPH_FUSIONS, "ort", kept)
        return to_onnx(model, example, "ort", dynamic_shapes=shapes)


def _masked(inputs, seed):
    """``inputs`` with a boolean mask: each row's first positions padded (row 0 none)."""
    batch, past = inputs[3].shape[0], inputs[3].shape[2]
    mask = torch.ones(batch, 1, 1, past + 1, dtype=torch.bool)
    for row in range(1, batch):
        mask[row, ..., : min(past, (row + seed) % 4 + 1)] = False
    return (*inputs, mask)


def _folded(proto) -> bool:
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(attention) == 1
    return any(a.name == "q_num_heads" for a in attention[0].attribute)


@pytest.mark.parametrize("batch,heads,kv_heads,head", [(1, 9, 3, 64), (2, 4, 2, 16), (3, 2, 2, 8)])
@pytest.mark.parametrize("rope", [True, False])
def test_decode_attention_is_one_op_with_the_past_and_computes_the_same(batch, heads, kv_heads, head, rope):
    model = CachedAttention(heads, kv_heads, head, rope=rope)
    example = _inputs(batch, heads, kv_heads, head, seq=1, past=6)
    folded, plain = _export(model, example), _export(model, example, fold=False)
    ops = [n.op_type for n in folded.graph.node]
    assert _folded(folded) and not _folded(plain)
    assert "Transpose" not in ops and "Reshape" not in ops, ops
    # the one Concat left builds RoPE's tables (cat(freqs, freqs)); the cache's are in the op
    assert ops.count("RotaryEmbedding") == ops.count("Concat") * 2 == (2 if rope else 0), ops
    fast, slow = OrtSession(folded), OrtSession(plain)
    for trial, past in enumerate([6, 31, 2, 0]):  # the cache grows; an empty one
        inputs = _inputs(batch, heads, kv_heads, head, 1, past, seed=trial + 1)
        got, same = fast(*inputs), slow(*inputs)
        for g, s, exact in zip(got, same, _float64(model, inputs)):
            assert g.shape == exact.shape
            assert torch.equal(g, s)  # ONNX Runtime's 3-D op: the 4-D graph's values exactly
            assert rel_err(g, exact) < 1e-5


@pytest.mark.parametrize("batch,heads,kv_heads,head,window", [(2, 9, 3, 64, None), (3, 4, 1, 16, None),
                                                              (2, 4, 4, 8, None), (2, 4, 2, 16, 4)])
def test_repeated_heads_and_a_mask_fold_too(batch, heads, kv_heads, head, window):
    model = MaskedAttention(heads, kv_heads, head)
    model.window = window
    example = _masked(_inputs(batch, heads, kv_heads, head, seq=1, past=6), 0)
    folded, plain = _export(model, example), _export(model, example, fold=False)
    ops = [n.op_type for n in folded.graph.node]
    assert _folded(folded) and not _folded(plain)
    assert not {"Expand", "Transpose", "Reshape"} & set(ops), ops
    fast, slow = OrtSession(folded), OrtSession(plain)
    for trial, past in enumerate([6, 17, 3]):
        inputs = _masked(_inputs(batch, heads, kv_heads, head, 1, past, seed=trial + 1), trial)
        for g, s, exact in zip(fast(*inputs), slow(*inputs), _float64(model, inputs)):
            assert torch.equal(g, s)
            assert rel_err(g, exact) < 1e-5


def test_a_causal_mask_over_a_past_keeps_the_4d_graph():
    # the 3-D op aligns a causal mask over a past to the keys' end, the 4-D op over the
    # concatenated keys to their start: not the same computation
    model = CachedAttention(4, 2, 16, causal=True)
    example = _inputs(1, 4, 2, 16, seq=3, past=5)
    proto = to_onnx(model, example, "ort", dynamic=False)
    assert not _folded(proto) and "Concat" in [n.op_type for n in proto.graph.node]
    got = OrtSession(proto)(*example)
    for g, exact in zip(got, _float64(model, example)):
        assert rel_err(g, exact) < 1e-5


def test_a_head_split_read_elsewhere_keeps_the_4d_graph():
    model = CachedAttention(4, 2, 16, leak=True)
    example = _inputs(2, 4, 2, 16, seq=1, past=5)
    proto = _export(model, example)
    assert not _folded(proto)
    for g, exact in zip(OrtSession(proto)(*example), _float64(model, example)):
        assert rel_err(g, exact) < 1e-5


def test_nan_in_the_past_reaches_the_output_and_the_present_cache():
    model = CachedAttention(4, 2, 16)
    example = _inputs(2, 4, 2, 16, seq=1, past=5)
    proto = _export(model, example)
    assert _folded(proto)
    past_v = example[4].clone()
    past_v[1, 0, 2, 3] = float("nan")
    out, present_k, present_v = OrtSession(proto)(*example[:4], past_v, example[5])
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any()
    assert torch.isnan(present_v[1, 0, 2, 3]) and not torch.isnan(present_k).any()
