"""The one-trace ONNX translation (``lowering.onnx_translate``): the same file as the exporter's
decomposition path on every architecture, its aliases, and the fallback where it cannot vouch."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qcompiler
import tiny_models
from qcompiler.lowering import onnx_translate
from qcompiler.lowering.onnx import to_onnx

# architectures whose traced program needs the exporter's decomposition, and why
NEEDS_DECOMPOSITION = {"mpnet": {"aten.add_.Tensor (mutates its input)", "aten.min.other (no ONNX translation)"}}


@pytest.fixture
def spied(monkeypatch):
    """Each ``blockers`` answer of the exports run under it."""
    seen = []
    real = onnx_translate.blockers

    def spy(program, registry):
        found = real(program, registry)
        seen.append(found)
        return found

    monkeypatch.setattr(onnx_translate, "blockers", spy)
    return seen


def _decomposition_only(monkeypatch):
    monkeypatch.setattr(onnx_translate, "internals", lambda: onnx_translate.Internals(None, ("forced by the test",)))


def _outputs(path, feeds):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n].numpy() for n in names})


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
@pytest.mark.parametrize("arch", list(tiny_models.ARCHITECTURES))
def test_direct_translation_writes_what_the_decomposition_path_writes(arch, recipe, tmp_path, spied, monkeypatch):
    model, vocab = tiny_models.build(arch)
    example = tiny_models.token_batch(vocab, 2, 12, padded=True)
    direct = str(tmp_path / "direct.onnx")
    qcompiler.export_onnx(model, example, direct, recipe=recipe, form="ort")
    assert spied and set(spied[-1]) == NEEDS_DECOMPOSITION.get(arch, set())
    _decomposition_only(monkeypatch)
    decomposed = str(tmp_path / "decomposed.onnx")
    qcompiler.export_onnx(model, example, decomposed, recipe=recipe, form="ort")
    # other sizes than the example: the dimensions stayed symbolic on both paths
    for batch, length in [(1, 5), (3, 17)]:
        feeds = tiny_models.token_batch(vocab, batch, length, seed=batch + length, padded=True)
        a, b = _outputs(direct, feeds), _outputs(decomposed, feeds)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x.shape == y.shape and np.isfinite(x).all()
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * max(1.0, float(np.abs(y).max())))


class Aliased(nn.Module):
    """Ops the exporter's table has no translation for, as models write them."""

    def forward(self, x, mask):
        keep = (mask > 0) & (x.sum(-1) > -1e9)                  # aten.__and__.Tensor
        y = x.to(torch.float64).to(x.dtype) * keep.to(x.dtype)[..., None]  # aten.to.dtype
        y = y.reshape(x.shape[0], -1, 4)                       # a -1 the trace resolves to 4 * 3
        return y.to(mask.device) + 1                           # aten.to.device


class Mutating(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return x * 2


def _run_torch_and_onnx(module, inputs, tmp_path):
    onnx.save(to_onnx(module, inputs, "ort"), str(tmp_path / "m.onnx"))
    return _run_onnx_again(tmp_path, inputs)


def test_aliases_translate_directly_and_compute_what_torch_does(tmp_path, spied):
    x, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    out = _run_torch_and_onnx(Aliased(), (x, mask), tmp_path)
    assert spied == [[]]
    np.testing.assert_allclose(out[0], Aliased()(x, mask).numpy(), rtol=1e-6, atol=1e-6)
    x2, mask2 = torch.randn(3, 7, 12), torch.ones(3, 7, dtype=torch.long)  # other sizes
    session_out = _run_onnx_again(tmp_path, (x2, mask2))
    np.testing.assert_allclose(session_out[0], Aliased()(x2, mask2).numpy(), rtol=1e-6, atol=1e-6)


def _run_onnx_again(tmp_path, inputs):
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, [t.numpy() for t in inputs])))


def test_a_mutating_program_goes_through_the_decomposition_and_stays_right(tmp_path, spied):
    x = torch.randn(3, 4)
    out = _run_torch_and_onnx(Mutating(), (x,), tmp_path)
    assert any("mutates" in reason for reason in spied[-1])
    np.testing.assert_allclose(out[0], (x * 2).numpy(), rtol=0, atol=0)


def test_an_exporter_without_the_internals_falls_back_and_names_them(monkeypatch, tmp_path):
    present = onnx_translate.internals()
    assert present.missing == ()
    monkeypatch.setattr(onnx_translate, "_INTERNALS", onnx_translate._INTERNALS + (("torch.onnx", "no_such_step"),))
    assert onnx_translate.internals().missing == ("torch.onnx.no_such_step",)
    x, mask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 1]])
    out = _run_torch_and_onnx(Aliased(), (x, mask), tmp_path)  # through torch.onnx.export
    np.testing.assert_allclose(out[0], Aliased()(x, mask).numpy(), rtol=1e-6, atol=1e-6)


def test_rewrites_where_possible_skip_absent_ops_and_follow_the_ops_a_rewrite_brings(monkeypatch):
    """``onnx_rule_filter.RewriteWherePossible``: a rule whose ops a rewrite brings in still runs
    (Relu -> Abs -> Neg), a rule whose ops never occur is not tried, and the graph comes out as
    onnxscript's own pass leaves it."""
    from onnx import TensorProto, helper
    from onnxscript import ir, rewriter
    from onnxscript.rewriter import pattern

    from qcompiler.lowering import onnx_rule_filter

    rules = [
        pattern.RewriteRule(lambda op, x: op.Abs(x), lambda op, x: op.Neg(x)),
        pattern.RewriteRule(lambda op, x: op.Relu(x), lambda op, x: op.Abs(x)),
        pattern.RewriteRule(lambda op, x, w: op.Conv(x, w), lambda op, x, w: op.Identity(x)),
        # a choice: a Neg of a Sigmoid or of a Conv matches without any Conv in the graph
        pattern.RewriteRule(
            lambda op, x: op.Neg(pattern.OrValue([op.Sigmoid(x), op.Conv(x, x)], tag_var="k", tag_values=[0, 1])),
            lambda op, x, k: op.Tanh(x)),
    ]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Sigmoid", ["x"], ["s"]),
                               helper.make_node("Neg", ["s"], ["z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ours, theirs = ir.serde.deserialize_model(proto), ir.serde.deserialize_model(proto)
    passed = []
    real = rewriter.RewritePass

    def recording(ready):
        passed.append([rules.index(rule) for rule in ready])
        return real(ready)

    monkeypatch.setattr(onnx_rule_filter.rewriter, "RewritePass", recording)
    assert onnx_rule_filter.RewriteWherePossible(rules)(ours).modified
    monkeypatch.setattr(onnx_rule_filter.rewriter, "RewritePass", real)
    for _ in range(2):
        rewriter.RewritePass(rules)(theirs)
    assert [n.op_type for n in ours.graph] == [n.op_type for n in theirs.graph]
    assert sorted(n.op_type for n in ours.graph) == ["Neg", "Tanh"]
    assert passed == [[1, 3], [0]]  # Relu's and the choice's rules, then Abs's once a rewrite made an Abs; never Conv's


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_graphs_translate_directly_and_match_eager(arch, spied, tmp_path, monkeypatch):
    """Dynamo's prompt and decode graphs (``dynamic=True``, the ``ort`` target) need no
    decomposition, and what they compute is still the model's: logits against eager's."""
    from qcompiler.passes.sqnr import sqnr_db

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))  # exported afresh, not read from a cache
    model, vocab = tiny_models.build(arch)
    model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True, options={"target": "ort"})
    prompt = tiny_models.token_batch(vocab, 1, 9)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
        full = out.sequences
        eager = type(model).forward(model, input_ids=full, attention_mask=torch.ones_like(full)).logits
    assert spied == [[], []]  # the prompt graph, the decode graph
    for step, logits in enumerate(out.logits):
        assert sqnr_db(eager[:, 8 + step], logits) > 25, step
