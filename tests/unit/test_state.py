"""The quantization state is an object each model owns, and each compile keeps its own decisions:
two models, two compiles or a deep copy never see each other's statistics or reports."""
import copy

import pytest
import torch
from torch import nn

from qcompiler.calibration.state import state_of
import qcompiler
from models import Stack


def _calibrated(seed=0):
    torch.manual_seed(seed)
    model, x = Stack().eval(), torch.randn(2, 8, 48)
    qcompiler.calibrate(model, [x], progress=False)
    return model, x


def test_statistics_live_in_the_models_own_state():
    model, _ = _calibrated()
    other = Stack()
    state = state_of(model)
    assert set(state.stats) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert qcompiler.calibration.state.stats_for(model.lm_head.weight) is state.stats["lm_head"]
    assert qcompiler.calibration.state.stats_for(other.lm_head.weight) is None
    assert not state_of(other).stats


def test_a_deep_copy_has_its_own_state():
    model, x = _calibrated()
    twin = copy.deepcopy(model)
    assert state_of(twin) is not state_of(model)
    assert qcompiler.calibration.state.stats_for(twin.lm_head.weight) is state_of(twin).stats["lm_head"]
    assert torch.equal(state_of(twin).stats["lm_head"].channel_absmax, state_of(model).stats["lm_head"].channel_absmax)
    qcompiler.calibration.state.forget(twin)
    assert qcompiler.calibration.state.stats_for(model.lm_head.weight) is not None  # the original keeps its own
    # the copy compiles with its own (empty) state: a static recipe asks for calibration
    fast = torch.compile(twin, backend="qcompile", options={"recipe": "w8a8-smoothquant", "target": "reference"})
    with pytest.raises(Exception, match="calibrat"):
        fast(x)


def test_explain_describes_the_compile_it_is_given():
    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 8, 48)
    f1 = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "target": "reference"})
    f1(x)
    f2 = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": "reference"})
    f2(x)
    schemes = lambda f: {r.scheme for r in qcompiler.explain(f) if r.op == "linear"}
    assert schemes(f1) == {"w8a16"}
    assert schemes(f2) == {"w8a8"}
    assert schemes(model) == {"w8a8"}  # the module itself: its latest compile


@pytest.mark.parametrize("use_recipe", [False, True])
def test_calibration_runs_in_eval_mode_and_restores_the_mode(use_recipe):
    torch.manual_seed(0)
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            seen.append(self.training)
            return self.lin(self.drop(x))

    model = Probe().train()
    batches = [torch.randn(2, 16) for _ in range(2)]
    if use_recipe:
        qcompiler.calibrate(model, batches, recipe="w4a16-gptq", progress=False)
    else:
        qcompiler.calibrate(model, batches, progress=False)
    assert seen and not any(seen)
    assert model.training and model.drop.training and model.lin.training
    # eval: dropout off, so the statistics are those of the inputs themselves
    absmax = torch.stack(batches).abs().amax(dim=(0, 1))
    assert torch.equal(state_of(model).stats["lin"].channel_absmax, absmax)
