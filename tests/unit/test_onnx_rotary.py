"""The ort form's RoPE rewrite (``lowering.onnx_rotary``): ``x * cos + rotate_half(x) * sin`` becomes
one ``RotaryEmbedding`` with the model's own tables, matching float64 for every batch row's own
positions; tables whose halves differ are left to the plain ops."""
import pytest
import torch
from torch import nn

from conftest import rel_err
from qcompiler.lowering.onnx import to_onnx
from qcompiler.runtimes.ort_session import OrtSession


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rope(nn.Module):
    """transformers' RoPE (``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb``) on q and k heads;
    ``same_halves=False`` builds the table from two different frequency sets."""

    def __init__(self, head: int, same_halves: bool = True, scaling: float = 1.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head, 2).float() / head))
        self.same_halves, self.scaling = same_halves, scaling

    def forward(self, q, k, position_ids):
        freqs = position_ids[:, :, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs if self.same_halves else freqs * 1.5), dim=-1)
        cos, sin = (emb.cos() * self.scaling).unsqueeze(1), (emb.sin() * self.scaling).unsqueeze(1)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _float64(q, k, position_ids, model: Rope):
    freqs = position_ids[:, :, None].double() * model.inv_freq.double()
    emb = torch.cat((freqs, freqs if model.same_halves else freqs * 1.5), dim=-1)
    cos, sin = (emb.cos() * model.scaling).unsqueeze(1), (emb.sin() * model.scaling).unsqueeze(1)
    return [x.double() * cos + _rotate_half(x.double()) * sin for x in (q, k)]


@pytest.mark.parametrize("batch,heads,kv_heads,head", [(1, 4, 2, 16), (3, 9, 3, 64), (2, 2, 2, 8)])
@pytest.mark.parametrize("scaling", [1.0, 0.75])
def test_rope_is_one_op_matching_float64_per_row_positions(batch, heads, kv_heads, head, scaling):
    model = Rope(head, scaling=scaling)
    torch.manual_seed(batch * head)
    seq = 5
    example = (torch.randn(batch, heads, seq, head), torch.randn(batch, kv_heads, seq, head),
               torch.arange(seq).repeat(batch, 1))
    proto = to_onnx(model, example, "ort")
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("RotaryEmbedding") == 2 and "Neg" not in ops, ops
    session = OrtSession(proto)
    for trial in range(5):  # new lengths, each row at positions of its own (left padding, a cache)
        torch.manual_seed(trial)
        length = 1 + 3 * trial
        q, k = torch.randn(batch, heads, length, head) * 4, torch.randn(batch, kv_heads, length, head)
        start = torch.randint(0, 300, (batch, 1))
        positions = start + torch.arange(length)
        got = session(q, k, positions)
        for g, exact, ref in zip(got, _float64(q, k, positions, model), model(q, k, positions)):
            # float32 angles of positions in the hundreds are off by ~1e-5 in torch as well: the
            # bound that matters is torch's own float32 error
            assert rel_err(g, exact) < 5e-5 and rel_err(g, exact) <= 2 * rel_err(ref, exact) + 1e-7


def test_tables_whose_halves_differ_keep_the_plain_ops():
    model = Rope(16, same_halves=False)
    example = (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.arange(5).repeat(2, 1))
    proto = to_onnx(model, example, "ort")
    assert "RotaryEmbedding" not in [n.op_type for n in proto.graph.node]
    got = OrtSession(proto)(*example)
    for g, exact in zip(got, _float64(*example, model)):
        assert rel_err(g, exact) < 1e-6


def test_nan_in_a_head_stays_in_its_row():
    model = Rope(16)
    example = (torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.arange(5).repeat(2, 1))
    session = OrtSession(to_onnx(model, example, "ort"))
    q = example[0].clone()
    q[1, 2, 3, 5] = float("nan")
    got = session(q, example[1], example[2])[0]
    assert torch.isnan(got[1, 2, 3]).any() and not torch.isnan(got[0]).any()
