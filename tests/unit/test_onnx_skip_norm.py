"""``lowering.onnx_skip_norm``: a few-row residual ``Add`` and the RMS normalization that reads it
become one ``SkipSimplifiedLayerNormalization`` in the ``ort`` target's own sessions: the sum (read
again later) bit for bit, the normalization within float32 rounding of float64, as the two nodes'
(its sum of squares may add in another order); more rows keep the two nodes; a NaN or an infinity in either
addend leaves the same outputs non-finite; a tiny decoder's decode step fuses every norm that reads
a sum."""
import numpy as np
import pytest
import torch
from torch import nn

from conftest import rel_err
from qcompiler.api.backend import compiled_graphs
from qcompiler.lowering.onnx import to_onnx
from qcompiler.runtimes.ort_session import OrtSession
from tiny_models import build, token_batch

K = 96


class SumThenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(K, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, r, x):
        h = r + x
        return self.norm(h), h * 2  # the sum is read again, as the next residual add reads it


def _ops(proto) -> list:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("rows", [1, 2, 16])
def test_a_few_row_sum_and_norm_are_one_op_with_the_same_values(rows):
    torch.manual_seed(rows)
    model = SumThenNorm()
    example = (torch.randn(1, rows, K), torch.randn(1, rows, K))
    host = to_onnx(model, example, "ort", dynamic=False, host=True)
    portable = to_onnx(model, example, "ort", dynamic=False)
    fused = "SkipSimplifiedLayerNormalization" in _ops(host)
    assert fused == (rows == 1), _ops(host)
    assert "SkipSimplifiedLayerNormalization" not in _ops(portable)
    fast, plain = OrtSession(host), OrtSession(portable)
    errors = []
    for seed in range(20):
        torch.manual_seed(100 + seed)
        inputs = (torch.randn(1, rows, K) * 3, torch.randn(1, rows, K))
        (normed, summed), (plain_normed, plain_summed) = fast(*inputs), plain(*inputs)
        assert torch.equal(summed, plain_summed)
        h = inputs[0].double() + inputs[1].double()
        exact = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * model.norm.weight.double()
        errors.append((rel_err(normed, exact), rel_err(plain_normed, exact)))
    fused_err, plain_err = np.asarray(errors).T
    # float32 rounding: a few units of 2**-24 (6e-8) on average, as the two nodes
    assert fused_err.max() < 1e-6 and fused_err.mean() < 2e-7 and plain_err.mean() < 2e-7, (fused_err, plain_err)


@pytest.mark.parametrize("slot", [0, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nan_in_either_addend_leaves_the_same_outputs_non_finite(slot, bad):
    model = SumThenNorm()
    example = (torch.randn(1, 1, K), torch.randn(1, 1, K))
    fast = OrtSession(to_onnx(model, example, "ort", dynamic=False, host=True))
    plain = OrtSession(to_onnx(model, example, "ort", dynamic=False))
    inputs = [torch.randn(1, 1, K), torch.randn(1, 1, K)]
    inputs[slot][0, 0, 4] = bad
    for got, want in zip(fast(*inputs), plain(*inputs)):
        assert not torch.isfinite(got).all()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_a_decode_step_fuses_every_norm_of_a_residual_sum(arch):
    model, vocab = build(arch)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-blocks"}, dynamic=True)
    with torch.no_grad():
        cache = fast(**token_batch(vocab, 1, 6), use_cache=True).past_key_values
        fast(input_ids=torch.tensor([[3]]), past_key_values=cache, use_cache=True)
    counts = sorted(_ops(g.fn.session.graph).count("SkipSimplifiedLayerNormalization")
                    for g in compiled_graphs(fast) if g.running_target == "ort")
    # every norm but the first layer's (it reads the embedding): the post-attention norms, the
    # next layers' input norms and the final norm; the prompt's graph has many rows and none
    assert counts == [0, 2 * model.config.num_hidden_layers], counts
