"""Targets: an explicit target is a contract (an error naming why and the fix when it cannot run),
``target="auto"`` may fall back and says so, and new shapes under ``dynamic=True`` never crash."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompiler.lowering import LOWERINGS, TargetUnavailable, auto_choice
from qcompiler.passes.sqnr import sqnr_db
import qcompiler


class MLPBlock(nn.Module):
    def __init__(self, d=256):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


@pytest.mark.parametrize("target", ["auto", "ort", "inductor"])
def test_dynamic_true_takes_new_shapes_without_falling_back(target):
    """Every size symbolic: the feature size is the weights', so the ort export still happens and
    no fallback is compiled for the first call's shapes (it crashed at the second shape)."""
    torch.manual_seed(0)
    model = nn.Sequential(MLPBlock(), MLPBlock()).eval()
    fast = torch.compile(model, backend="qcompile", dynamic=True, options={"target": target})
    for shape in [(4, 32, 256), (3, 65, 256), (1, 7, 256), (5, 2, 256)]:
        x = torch.randn(shape)
        assert sqnr_db(model(x), fast(x)) > 25, shape
    expected = "ort" if target == "auto" else target
    assert {g.running for g in qcompiler.explain(fast).graphs} == {expected}


def _hide(monkeypatch, *modules):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))


def test_explicit_ort_without_onnxruntime_is_an_error_naming_the_fix(monkeypatch):
    _hide(monkeypatch, "onnxruntime")
    model, x = nn.Linear(16, 16), torch.randn(2, 16)
    with pytest.raises(qcompiler.TargetUnavailable, match=r"target 'ort' cannot run here: onnxruntime not installed: "
                                                          r"pip install onnx onnxruntime"):
        torch.compile(model, backend="qcompile", options={"target": "ort"})(x)


def test_auto_without_onnxruntime_runs_inductor_and_says_why(monkeypatch):
    _hide(monkeypatch, "onnxruntime")
    torch.manual_seed(0)
    model, x = nn.Linear(16, 16).eval(), torch.randn(2, 16)
    fast = torch.compile(model, backend="qcompile")
    assert sqnr_db(model(x), fast(x)) > 30
    (graph,) = qcompiler.explain(fast).graphs
    assert graph.running == "inductor" and "onnxruntime not installed" in graph.reason
    assert "runs on inductor" in str(qcompiler.explain(fast))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU without a CUDA device")
def test_explicit_triton_on_the_cpu_is_an_error_naming_the_fix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(TargetUnavailable, match="target 'triton' cannot run here: .*CUDA device"):
        LOWERINGS["triton"].check([torch.randn(2, 2)])


def test_auto_choice_names_each_target_it_passed_over():
    name, reason = auto_choice("cpu", [torch.randn(2, 2, dtype=torch.bfloat16)])
    assert name == "inductor" and reason.startswith("ort: 'ort' is measured on float32 models")
    assert auto_choice("cpu", [torch.randn(2, 2)]) == ("ort", "")
