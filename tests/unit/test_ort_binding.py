"""How an ``OrtSession`` binds torch tensors to ONNX Runtime: the extension module's binding where
this onnxruntime has it, its documented ``IOBinding`` otherwise, the same outputs bit for bit.

A model with float32, int64, bool and bfloat16 inputs and outputs (non-contiguous inputs among
them) runs through both on fresh random inputs; a missing extension binding falls back.
"""
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper

from qcompiler.runtimes import ort_session
from qcompiler.runtimes.ort_session import DirectBinding, OrtSession, PublicBinding

vi = helper.make_tensor_value_info


def _model() -> bytes:
    nodes = [helper.make_node("Neg", ["x"], ["neg"]), helper.make_node("Add", ["i", "i"], ["twice"]),
             helper.make_node("Not", ["m"], ["flipped"]), helper.make_node("Cast", ["h"], ["widened"], to=T.FLOAT),
             helper.make_node("Cast", ["x"], ["narrowed"], to=T.BFLOAT16)]
    graph = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["A", "B"]), vi("i", T.INT64, ["N"]), vi("m", T.BOOL, ["N"]),
                                           vi("h", T.BFLOAT16, ["N"])],
                              [vi("neg", T.FLOAT, ["A", "B"]), vi("twice", T.INT64, ["N"]), vi("flipped", T.BOOL, ["N"]),
                               vi("widened", T.FLOAT, ["N"]), vi("narrowed", T.BFLOAT16, ["A", "B"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, generator=g).t()  # non-contiguous
    return (x, torch.randint(-1000, 1000, (6,), generator=g), torch.rand(6, generator=g) > 0.5,
            torch.randn(12, generator=g).bfloat16()[::2])


def _expected(x, i, m, h):
    return [-x, i * 2, ~m, h.float(), x.bfloat16()]


@pytest.mark.parametrize("binder", [PublicBinding, DirectBinding])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_binding_runs_every_type_to_the_expected_outputs(binder, seed):
    if binder is DirectBinding and not DirectBinding.available():
        pytest.skip("this onnxruntime has no extension-module binding")
    session = OrtSession(_model(), threads=1)
    session._binder = binder
    inputs = _inputs(seed)
    for out, ref in zip(session(*inputs), _expected(*inputs)):
        assert out.dtype == ref.dtype and torch.equal(out, ref)


@pytest.mark.parametrize("binder", [PublicBinding, DirectBinding])
def test_contiguous_inputs_that_require_grad_are_bound_as_they_are(binder):
    if binder is DirectBinding and not DirectBinding.available():
        pytest.skip("this onnxruntime has no extension-module binding")
    session = OrtSession(_model(), threads=1)
    session._binder = binder
    x, i, m, h = _inputs(3)
    x, h = x.contiguous().requires_grad_(), h.contiguous().requires_grad_()
    for out, ref in zip(session(x, i, m, h), _expected(x.detach(), i, m, h.detach())):
        assert not out.requires_grad and out.dtype == ref.dtype and torch.equal(out, ref)


def test_the_session_binds_directly_where_it_can_and_falls_back_where_it_cannot(monkeypatch):
    assert OrtSession(_model(), threads=1)._binder is (DirectBinding if DirectBinding.available() else PublicBinding)
    monkeypatch.setattr(ort_session.DirectBinding, "available", staticmethod(lambda: False))
    session = OrtSession(_model(), threads=1)
    assert session._binder is PublicBinding
    inputs = _inputs(2)
    assert all(torch.equal(o, r) for o, r in zip(session(*inputs), _expected(*inputs)))


def test_a_wrong_number_of_inputs_names_them():
    with pytest.raises(ValueError, match="takes 4 inputs"):
        OrtSession(_model(), threads=1)(torch.zeros(2, 2))
