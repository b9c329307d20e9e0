"""How an ``OrtSession`` hands torch tensors to ONNX Runtime: in one batched call each way where
this onnxruntime has it, through the extension module's binding or its documented ``IOBinding``
otherwise; the same outputs bit for bit.

Models with float32, float16, int8, int64, bool and bfloat16 inputs and outputs (non-contiguous and
empty inputs among them) run through each path on fresh random inputs; a call with a bfloat16
input, which numpy cannot type, is bound one tensor at a time; a missing path falls back.
"""
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper

from qcompiler.runtimes import ort_session
from qcompiler.runtimes.ort_session import BatchedRun, DirectBinding, OrtSession, PublicBinding

vi = helper.make_tensor_value_info
RUNNERS = ["batched", DirectBinding, PublicBinding]


def _model(bfloat16_input: bool = True) -> bytes:
    """Neg (float32), Add (int64), Not (bool), a widening Cast (bfloat16 or float16 in), a narrowing
    Cast to bfloat16 and an int8 Neg: every output type the ort target's graphs return."""
    h_type = T.BFLOAT16 if bfloat16_input else T.FLOAT16
    nodes = [helper.make_node("Neg", ["x"], ["neg"]), helper.make_node("Add", ["i", "i"], ["twice"]),
             helper.make_node("Not", ["m"], ["flipped"]), helper.make_node("Cast", ["h"], ["widened"], to=T.FLOAT),
             helper.make_node("Cast", ["x"], ["narrowed"], to=T.BFLOAT16), helper.make_node("Neg", ["c"], ["c_neg"])]
    graph = helper.make_graph(nodes, "g", [vi("x", T.FLOAT, ["A", "B"]), vi("i", T.INT64, ["N"]), vi("m", T.BOOL, ["N"]),
                                           vi("h", h_type, ["N"]), vi("c", T.INT8, ["C"])],
                              [vi("neg", T.FLOAT, ["A", "B"]), vi("twice", T.INT64, ["N"]), vi("flipped", T.BOOL, ["N"]),
                               vi("widened", T.FLOAT, ["N"]), vi("narrowed", T.BFLOAT16, ["A", "B"]),
                               vi("c_neg", T.INT8, ["C"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _inputs(seed: int, bfloat16_input: bool = True, rows: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, generator=g).t()  # non-contiguous
    half = torch.bfloat16 if bfloat16_input else torch.float16
    return (x, torch.randint(-1000, 1000, (6,), generator=g), torch.rand(6, generator=g) > 0.5,
            torch.randn(12, generator=g).to(half)[::2], torch.randint(-127, 128, (9,), generator=g, dtype=torch.int8))


def _expected(x, i, m, h, c):
    return [-x, i * 2, ~m, h.float(), x.bfloat16(), -c]


def _session(runner, bfloat16_input: bool = True) -> OrtSession:
    session = OrtSession(_model(bfloat16_input), threads=1)
    if runner == "batched":
        if session._batched is None:
            pytest.skip("this onnxruntime has no batched run")
    else:
        if runner is DirectBinding and not DirectBinding.available():
            pytest.skip("this onnxruntime has no extension-module binding")
        session._batched, session._binder = None, runner
    return session


def _check(outputs, expected):
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert not out.requires_grad and out.dtype == ref.dtype and out.shape == ref.shape and torch.equal(out, ref)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("bfloat16_input", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_each_path_runs_every_type_to_the_expected_outputs(runner, bfloat16_input, seed):
    session = _session(runner, bfloat16_input)
    inputs = _inputs(seed, bfloat16_input)
    _check(session(*inputs), _expected(*inputs))


@pytest.mark.parametrize("runner", RUNNERS)
def test_contiguous_inputs_that_require_grad_are_bound_as_they_are(runner):
    session = _session(runner, bfloat16_input=False)
    x, i, m, h, c = _inputs(3, bfloat16_input=False)
    x, h = x.contiguous().requires_grad_(), h.contiguous().requires_grad_()
    _check(session(x, i, m, h, c), _expected(x.detach(), i, m, h.detach(), c))


@pytest.mark.parametrize("runner", RUNNERS)
def test_empty_inputs_give_empty_outputs(runner):
    session = _session(runner, bfloat16_input=False)
    inputs = _inputs(4, bfloat16_input=False, rows=0)
    _check(session(*inputs), _expected(*inputs))


def test_outputs_own_their_memory_across_calls():
    """A batched call's outputs stay as they were after later calls (each owns what ONNX Runtime
    allocated for it; none is a view of a reused buffer)."""
    session = _session("batched", bfloat16_input=False)
    first = _inputs(5, bfloat16_input=False)
    kept = session(*first)
    for seed in (6, 7):
        session(*_inputs(seed, bfloat16_input=False))
    _check(kept, _expected(*first))


def test_the_session_takes_the_fastest_path_it_has_and_falls_back_where_it_cannot(monkeypatch):
    session = OrtSession(_model(), threads=1)
    assert (session._batched is not None) == BatchedRun.available()
    assert session._binder is (DirectBinding if DirectBinding.available() else PublicBinding)
    monkeypatch.setattr(ort_session.BatchedRun, "available", staticmethod(lambda: False))
    monkeypatch.setattr(ort_session.DirectBinding, "available", staticmethod(lambda: False))
    session = OrtSession(_model(), threads=1)
    assert session._batched is None and session._binder is PublicBinding
    inputs = _inputs(2)
    _check(session(*inputs), _expected(*inputs))


def test_a_bfloat16_input_is_bound_one_tensor_at_a_time(monkeypatch):
    session = OrtSession(_model(bfloat16_input=True), threads=1)
    if session._batched is None:
        pytest.skip("this onnxruntime has no batched run")
    calls = []
    monkeypatch.setattr(session._batched, "run", lambda *a: calls.append(a))
    inputs = _inputs(8)
    _check(session(*inputs), _expected(*inputs))
    assert not calls


def test_a_wrong_number_of_inputs_names_them():
    with pytest.raises(ValueError, match="takes 5 inputs"):
        OrtSession(_model(), threads=1)(torch.zeros(2, 2))


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_replaced_session_is_the_one_that_runs(runner):
    """Tools replace ``OrtSession.session`` (a profiled session of the same model): every path,
    the batched run's bound calls included, runs the new one."""
    import onnx

    from qcompiler.runtimes.ort_session import inference_session

    session = _session(runner, bfloat16_input=False)  # numpy types only: the batched run takes the call
    other = onnx.load_from_string(_model(bfloat16_input=False))
    other.graph.node[0].op_type = "Abs"  # "neg" becomes |x|: the same names, another result
    session.session = inference_session(other.SerializeToString(), threads=1)
    inputs = _inputs(9, bfloat16_input=False)
    outputs = session(*inputs)
    assert torch.equal(outputs[0], inputs[0].abs())
    _check(outputs[1:], _expected(*inputs)[1:])
