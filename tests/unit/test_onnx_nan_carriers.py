"""NaN carriers the host rewrite leaves out (``lowering.onnx_nan_carriers``): a few-row GEMV that
reads a normalization of a value reaching the output another way needs none; every other keeps
its own. Checked on small blocks (which carriers go, and that a NaN or an infinity still reaches
the output) and on tiny decoders' decode steps (a NaN in the residual stream or the past cache
reaches the logits)."""
import copy

import pytest
import torch
from onnxscript import ir
from torch import nn

from models import QOp
from qcompiler.api.backend import compiled_graphs
from qcompiler.lowering.onnx import to_onnx
from qcompiler.lowering.onnx_nan_carriers import carriers
from qcompiler.runtimes.ort_session import OrtSession
from tiny_models import build, token_batch

K = 96


def _norm(kind: str) -> nn.Module:
    norm = nn.RMSNorm(K) if kind == "rms" else nn.LayerNorm(K)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


class PreNorm(nn.Module):
    """``r + lin(norm(r))``: the residual carries a NaN of ``r`` past the GEMV."""

    def __init__(self, kind, gemm, norm="rms"):
        super().__init__()
        self.norm, self.lin = _norm(norm), QOp(gemm, K, K)

    def forward(self, r):
        return r + self.lin(self.norm(r))


class NormOnly(PreNorm):
    """``lin(norm(r))``: nothing else reads ``r``; the carrier must stay."""

    def forward(self, r):
        return self.lin(self.norm(r))


class TwoGemvs(PreNorm):
    """``r + lin2(lin1(norm(r)))``: lin1's carrier may go, lin2 reads no normalization."""

    def __init__(self, kind, gemm, norm="rms"):
        super().__init__(kind, gemm, norm)
        self.lin2 = QOp(gemm, K, K)

    def forward(self, r):
        return r + self.lin2(self.lin(self.norm(r)))


class NormOfNormOnly(PreNorm):
    """``norm2(r) + lin(norm(r))``: ``r`` reaches the output through the other normalization."""

    def __init__(self, kind, gemm, norm="rms"):
        super().__init__(kind, gemm, norm)
        self.norm2 = _norm(norm)

    def forward(self, r):
        return self.norm2(r) + self.lin(self.norm(r))


def _carriers(proto) -> int:
    return len(carriers(ir.serde.deserialize_model(proto).graph))


@pytest.mark.parametrize("gemm", ["dynamic", "blocks", "w4a16", "w8a16"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("block,left", [(PreNorm, 0), (NormOnly, 1), (TwoGemvs, 1), (NormOfNormOnly, 0)])
def test_a_carrier_goes_only_where_the_row_reaches_the_output_another_way(gemm, norm, block, left):
    torch.manual_seed(0)
    model = block(None, gemm, norm)
    proto = to_onnx(model, (torch.randn(1, 1, K),), "ort", dynamic=False, host=True)
    assert "MatMulNBits" in [n.op_type for n in proto.graph.node]
    assert _carriers(proto) == left
    session = OrtSession(proto)
    x = torch.randn(1, 1, K)
    assert torch.isfinite(session(x)[0]).all()
    for bad in (float("nan"), float("inf"), -float("inf")):
        dirty = x.clone()
        dirty[0, 0, 7] = bad
        assert not torch.isfinite(session(dirty)[0]).all(), (bad, model(dirty))


def test_a_normalization_with_a_nan_scale_keeps_its_carrier():
    torch.manual_seed(0)
    model = PreNorm(None, "dynamic")
    with torch.no_grad():
        model.norm.weight[3] = float("nan")
    proto = to_onnx(model, (torch.randn(1, 1, K),), "ort", dynamic=False, host=True)
    assert _carriers(proto) == 1
    assert torch.isnan(OrtSession(proto)(torch.randn(1, 1, K))[0]).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-blocks", "w4a16"])
def test_a_decode_step_keeps_the_carriers_its_logits_need(arch, recipe):
    """Per layer the carriers of ``o_proj`` and ``down_proj`` stay and those of q/k/v and gate/up
    go; the ``lm_head``'s stays. A NaN in the step's embedding (the residual stream) or in the
    past values reaches every logit."""
    model, vocab = build(arch)
    fast = torch.compile(model, backend="qcompile", options={"recipe": recipe}, dynamic=True)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        cache = fast(inputs_embeds=embed(token_batch(vocab, 1, 6)["input_ids"]), use_cache=True).past_key_values
        step = embed(torch.tensor([[3]]))

        def decode(e, past):
            return fast(inputs_embeds=e, past_key_values=past, use_cache=True).logits

        clean = decode(step, copy.deepcopy(cache))
        bad_step = step.clone()
        bad_step[0, 0, 5] = float("nan")
        from_step = decode(bad_step, copy.deepcopy(cache))
        bad_past = copy.deepcopy(cache)
        bad_past.layers[0].values[0, 0, 2, 1] = float("nan")
        from_past = decode(step, bad_past)
    assert torch.isfinite(clean).all()
    assert torch.isnan(from_step).all() and torch.isnan(from_past).all()
    decode_graphs = [g for g in compiled_graphs(fast) if g.running_target == "ort"
                     and any(n.op_type == "MatMulNBits" and any(a.name == "accuracy_level" and a.i == 4 for a in n.attribute)
                             for n in g.fn.session.graph.graph.node)]
    counts = sorted(_carriers(g.fn.session.model) for g in decode_graphs)
    layers = model.config.num_hidden_layers
    assert counts[-1] == 2 * layers + 1, counts
