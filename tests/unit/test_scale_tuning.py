"""End-to-end scale tuning (``qcompiler.algorithms.scale_tuning``) on small models: what it may change, what it gains."""
import types

import pytest
import torch
from torch import nn

import qcompiler
from models import Stack, with_outlier_channels
from qcompiler.algorithms import scale_tuning
from qcompiler.calibration.recorder import call_model, call_model_with
from qcompiler.calibration.state import prepared_for, state_of


class WithLogits(nn.Module):
    """A Stack whose output is an object with ``logits`` [B, T, V], as a Hugging Face LM's is."""

    def __init__(self):
        super().__init__()
        self.stack = Stack(n=2, d=64, h=96, head=40)

    def forward(self, x):
        return types.SimpleNamespace(logits=4 * self.stack(x))


def _model(output):
    torch.manual_seed(0)
    return WithLogits() if output == "logits" else Stack(n=2, d=64, h=96)


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [with_outlier_channels(torch.randn(2, 16, 64, generator=g)) for _ in range(n)]


def _prepared(model):
    return {n: prepared_for(m.weight) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and prepared_for(m.weight) is not None}


def _weights(prepared):
    return {f"{n}.weight": (p.weight.dequantize() if p.smooth_scale is None else p.weight.dequantize() / p.smooth_scale)
            for n, p in prepared.items()}


def _loss(model, params, batches):
    total = 0.0
    with torch.no_grad():
        for b in batches:
            ref, is_logits = scale_tuning.judged_output(call_model(model, b))
            out, _ = scale_tuning.judged_output(call_model_with(model, params, b))
            total += scale_tuning.output_loss(out, ref, is_logits).item()
    return total / len(batches)


@pytest.mark.parametrize("output", ["tensor", "logits"])
@pytest.mark.parametrize("algorithm", ["w4a16-awq", "w4a16-gptq", "w4a16-awq-gptq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_tuning_changes_only_the_scales_and_lowers_the_loss_on_held_out_batches(output, algorithm, symmetric):
    model = _model(output)
    batches = _batches(6, seed=1)
    opts = {"recipe": algorithm, "group_size": 32, "symmetric": symmetric}
    qcompiler.calibrate(model, batches, recipe=opts, progress=False)
    before = _prepared(model)
    qcompiler.calibrate(model, batches, recipe={**opts, "tune_epochs": 6, "tune_lr": 0.01}, progress=False)
    after = _prepared(model)
    assert before.keys() == after.keys() and len(after) == 15   # 2 blocks x 7 and the head (not tied here)
    for n, p in after.items():
        b = before[n]
        assert torch.equal(p.weight.packed, b.weight.packed), n
        assert (p.weight.zero is None) == symmetric and (symmetric or torch.equal(p.weight.zero, b.weight.zero))
        assert torch.isfinite(p.weight.scale).all() and (p.weight.scale > 0).all(), n
        assert p.weight.scale.shape == b.weight.scale.shape and "tuned end to end" in p.reason
        assert p.smooth_scale is b.smooth_scale or torch.equal(p.smooth_scale, b.smooth_scale)
    assert any(not torch.equal(p.weight.scale, before[n].weight.scale) for n, p in after.items())
    loss_before, loss_after = _loss(model, _weights(before), batches), _loss(model, _weights(after), batches)
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    # judged on batches neither calibration nor tuning saw: the gain is not only a fit to its own
    # data (on these tiny models it is smaller there: AWQ+GPTQ 3-9% against over 20%)
    held = _batches(4, seed=11)
    held_before, held_after = _loss(model, _weights(before), held), _loss(model, _weights(after), held)
    assert held_after < held_before, (held_before, held_after)
    first, last = state_of(model).last_run["tuning_loss"]
    assert last < first


def test_compiled_model_runs_the_tuned_scales():
    model = _model("tensor")
    batches = _batches(4, seed=2)
    opts = {"recipe": "w4a16-gptq", "group_size": 32, "tune_epochs": 3, "tune_lr": 0.01}
    qcompiler.calibrate(model, batches, recipe=opts, progress=False)
    x = _batches(1, seed=3)[0]
    ref = call_model_with(model, _weights(_prepared(model)), x).double()
    torch._dynamo.reset()
    out = torch.compile(model, backend="qcompile", options=opts)(x).double()
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_prepared_weights_of_untuned_calibration_are_not_reused_for_tuning():
    model = _model("tensor")
    qcompiler.calibrate(model, _batches(2, seed=4), recipe={"recipe": "w4a16-gptq", "group_size": 32}, progress=False)
    with pytest.raises(Exception, match="different INT4 setting"):
        torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "group_size": 32,
                                                         "tune_epochs": 2})(_batches(1, seed=5)[0])


def test_divergent_learning_rate_is_a_clear_error():
    with pytest.raises(qcompiler.CalibrationError, match="diverged.*lower tune_lr"):
        qcompiler.calibrate(_model("tensor"), _batches(3, seed=6), progress=False,
                            recipe={"recipe": "w4a16-gptq", "group_size": 32, "tune_epochs": 3, "tune_lr": 1e3})


@pytest.mark.parametrize("out,expected", [
    (types.SimpleNamespace(logits="L", last_hidden_state="H"), ("L", True)),
    ({"last_hidden_state": "H", "pooler_output": "P"}, ("H", False)),
    ({"pooler_output": "P"}, ("P", False)),
    (("T", "P"), ("T", False)),
    ("T", ("T", False)),
])
def test_the_output_judged_is_logits_first_then_hidden_state_then_the_first_tensor(out, expected):
    tensors = {name: torch.full((1,), float(i)) for i, name in enumerate("LHPT")}

    def real(o):
        if isinstance(o, str):
            return tensors[o]
        if isinstance(o, dict):
            return {k: real(v) for k, v in o.items()}
        if isinstance(o, tuple):
            return tuple(real(v) for v in o)
        return types.SimpleNamespace(**{k: real(v) for k, v in vars(o).items()})

    got, is_logits = scale_tuning.judged_output(real(out))
    assert got is tensors[expected[0]] and is_logits == expected[1]


def test_a_model_without_a_tensor_output_is_told_to_skip_tuning():
    with pytest.raises(qcompiler.CalibrationError, match="tune_epochs=0"):
        scale_tuning.judged_output({"n": 3})


@pytest.mark.parametrize("opts,match", [
    ({"recipe": "w8a8", "tune_epochs": 2}, "INT4 algorithm"),
    ({"recipe": "w4a16", "tune_epochs": 2}, "INT4 algorithm"),
    ({"recipe": "w4a16-gptq", "tune_epochs": -1}, "tune_epochs must be an integer >= 0"),
    ({"recipe": "w4a16-gptq", "tune_epochs": 1.5}, "tune_epochs must be an integer >= 0"),
    ({"recipe": "w4a16-awq", "tune_epochs": 1, "tune_lr": 0.0}, "tune_lr > 0"),
])
def test_bad_tuning_settings_are_refused_with_the_fix(opts, match):
    with pytest.raises(ValueError, match=match):
        qcompiler.recipes.resolve(opts)


def test_output_loss_is_zero_at_the_reference_and_nan_propagates():
    ref = torch.randn(2, 5, 11)
    assert scale_tuning.output_loss(ref, ref, True).abs().item() < 1e-6
    assert scale_tuning.output_loss(ref, ref, False).item() == 0
    assert scale_tuning.output_loss(ref + 0.1 * torch.randn_like(ref), ref, True).item() > 0
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    assert not torch.isfinite(scale_tuning.output_loss(bad, ref, True))
    assert not torch.isfinite(scale_tuning.output_loss(bad, ref, False))

