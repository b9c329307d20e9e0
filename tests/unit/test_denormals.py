"""Denormals flushed on the thread that runs an ONNX Runtime session, for the run only
(``runtimes.denormals``).

Inside ``flushing()`` and inside a session's run a result below float32's normal range is zero;
before and after, the thread computes as it did, whichever mode it was in; making the process's
first session (which ONNX Runtime would leave flushing on its thread for good) leaves the thread
as it was. NaN still reaches the output.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler.runtimes.denormals import flushing, mode
from qcompiler.runtimes.ort_session import OrtSession

TINY = float(np.finfo(np.float32).tiny)


@pytest.fixture(autouse=True)
def _plain_thread():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def _scale_model(factor: float):
    """``y = x * factor`` on float32."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Mul", ["x", "f"], ["y"])], "g", [vi("x", TensorProto.FLOAT, ["N"])],
                              [vi("y", TensorProto.FLOAT, ["N"])],
                              [numpy_helper.from_array(np.asarray(factor, np.float32), "f")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _denormal_survives() -> bool:
    return (torch.tensor([TINY]) / 4).item() != 0.0  # torch's own arithmetic on this thread


@pytest.mark.parametrize("before", [False, True])
def test_flushing_holds_inside_the_block_and_the_thread_mode_comes_back(before):
    torch.set_flush_denormal(before)
    assert mode() == (before, before) and _denormal_survives() is not before
    with flushing():
        assert mode() == (True, True) and not _denormal_survives()
    assert mode() == (before, before) and _denormal_survives() is not before


def test_flushing_puts_the_mode_back_after_an_error():
    with pytest.raises(RuntimeError):
        with flushing():
            raise RuntimeError("inside")
    assert mode() == (False, False)


def test_a_run_flushes_its_denormal_results_and_leaves_the_thread_as_it_was():
    session = OrtSession(_scale_model(0.25), threads=2)
    x = torch.tensor([TINY, 1.0, float("nan"), -TINY * 8, float("inf")])
    (y,) = session(x)
    assert y[0] == 0 and y[1] == 0.25 and torch.isnan(y[2]) and y[3] == -TINY * 2 and y[4] == float("inf")
    assert mode() == (False, False) and _denormal_survives()
    assert (x[:1] * 0.25).item() != 0.0  # the same product in torch, after the run, is a denormal again


def test_a_session_made_to_keep_denormals_keeps_them():
    """``flush_denormals=False`` (to measure the setting) computes with denormals, as torch does."""
    (y,) = OrtSession(_scale_model(0.25), threads=2, flush_denormals=False)(torch.tensor([TINY, 1.0]))
    assert y[0].item() == (torch.tensor([TINY]) * 0.25).item() != 0.0 and y[1] == 0.25


_FIRST_SESSION = """
import numpy as np, onnxruntime as ort, sys
sys.path.insert(0, {tests!r})
from test_denormals import _scale_model
from qcompiler.runtimes.denormals import mode
from qcompiler.runtimes.ort_session import OrtSession, session_options
assert mode() == (False, False)
if {raw}:
    ort.InferenceSession(_scale_model(0.5), session_options(1), providers=["CPUExecutionProvider"])
else:
    OrtSession(_scale_model(0.5), threads=1)
print(mode())
"""


@pytest.mark.parametrize("raw", [True, False])
def test_the_first_session_of_a_process_leaves_its_thread_as_it_was(raw):
    """ONNX Runtime sets the flushing mode, for good, on the thread that makes the process's first
    session asking for it (``raw``); a qcompile session puts the thread's mode back."""
    import os

    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _FIRST_SESSION.format(tests=tests, raw=raw)], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ("(True, True)" if raw else "(False, False)")
