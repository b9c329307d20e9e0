"""Saved quantization state: every recipe's state, loaded into a fresh process, compiles without
calibration to bit-identical outputs; the state survives ``explain`` and the compiled model."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import qcompiler
from artifact_roundtrip import BATCH, SEED, logits, parse
from qcompiler.calibration.state import linear_layers, state_of
from qcompiler.passes.meta import FLOATING_POINT
from qcompiler.runtimes.host_memory import FilePages
from tiny_models import build, token_batch

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "artifact_roundtrip.py")
# every registered recipe on the reference target; the CPU targets on one static recipe, with
# static attention (its calibrated constants) on two
CASES = [f"{r}@reference" for r in qcompiler.list_recipes()] + [
    "w8a8-smoothquant@ort", "w8a8-smoothquant@inductor", "w8a8-smoothquant:attention=int8@ort",
    "fp8-static:attention=fp8@inductor"]


def _calibrated(recipe: str):
    torch._dynamo.reset()
    model, vocab = build("llama", seed=SEED)
    batches = [token_batch(vocab, 2, 16, seed=s) for s in range(4)]
    qcompiler.calibrate(model, batches, recipe=recipe, progress=False)
    return model


def test_every_recipe_round_trips_bit_identically_in_a_fresh_process(tmp_path):
    expected = {}
    for case in CASES:
        recipe, target, extra = parse(case)
        model = _calibrated(recipe)
        expected[case] = logits(model, recipe, target, **extra)
        assert torch.isfinite(expected[case]).all()
        if not (tmp_path / recipe).exists():
            qcompiler.save(model, tmp_path / recipe, recipe=recipe)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, HELPER, str(tmp_path), *CASES], capture_output=True, text=True,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    differ = [case for case in CASES
              if not torch.equal(load_file(str(tmp_path / f"{case}.out"))["logits"], expected[case])]
    assert differ == []


def test_a_loaded_state_needs_no_calibration_and_keeps_the_decisions(tmp_path):
    model = _calibrated("w8a8-smoothquant")
    compiled = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothquant"})
    with torch.no_grad():
        compiled(**token_batch(model.config.vocab_size, **BATCH))
    report = qcompiler.explain(compiled)
    qcompiler.save(model, tmp_path, recipe="w8a8-smoothquant")
    fresh, vocab = build("llama", seed=SEED)
    fast = torch.compile(fresh, backend="qcompile", options={"recipe": "w8a8-smoothquant"})
    with pytest.raises(qcompiler.CalibrationError):  # static scales: nothing to compile from yet
        with torch.no_grad():
            fast(**token_batch(vocab, **BATCH))
    torch._dynamo.reset()
    assert qcompiler.load(fresh, tmp_path).name == "w8a8-smoothquant"
    fast = torch.compile(fresh, backend="qcompile", options={"recipe": "w8a8-smoothquant"})
    with torch.no_grad():
        fast(**token_batch(vocab, **BATCH))
    again = qcompiler.explain(fast)
    schemes = lambda r: sorted((rec.module, rec.scheme, rec.reason) for rec in r.records)  # noqa: E731
    assert schemes(again) == schemes(report) and sum(r.scheme != FLOATING_POINT for r in again.records) > 10


def test_loading_replaces_the_state_a_compiled_model_uses(tmp_path):
    """A model compiled before ``load`` rebuilds from the loaded state on its next call."""
    model = _calibrated("w8a8-static")
    qcompiler.save(model, tmp_path, recipe="w8a8-static")
    want = logits(model, "w8a8-static", "reference")
    other, vocab = build("llama", seed=SEED)
    qcompiler.calibrate(other, [token_batch(vocab, 2, 16, seed=s) for s in range(50, 52)], progress=False)
    fast = torch.compile(other, backend="qcompile", options={"recipe": "w8a8-static", "target": "reference"})
    with torch.no_grad():
        before = fast(**token_batch(vocab, **BATCH)).logits
        qcompiler.load(other, tmp_path)
        after = fast(**token_batch(vocab, **BATCH)).logits
    assert not torch.equal(before, want) and torch.equal(after, want)


CLI_MODEL = '''
import torch
from torch import nn


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()


def build():
    g = torch.Generator().manual_seed(1)
    return _model(), torch.randn(2, 8, 32), [torch.randn(2, 8, 32, generator=g) for _ in range(4)]


def build_without_data():
    return _model(), torch.randn(2, 8, 32)
'''


def test_cli_quantize_then_export_from_the_saved_state(tmp_path):
    (tmp_path / "climodel.py").write_text(CLI_MODEL)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])

    def qcompile(*args):
        return subprocess.run([sys.executable, "-m", "qcompiler.api.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)

    run = qcompile("quantize", "--model", "climodel:build", "--recipe", "w8a8-static", "--out", "state")
    assert run.returncode == 0 and "quantization state of climodel:build for w8a8-static" in run.stdout, run.stderr
    # without data and without the state, a static recipe has nothing to take its scales from
    run = qcompile("export", "--model", "climodel:build_without_data", "--recipe", "w8a8-static", "--out", "a.onnx")
    assert run.returncode == 2 and "calibrat" in run.stderr, run.stderr
    run = qcompile("export", "--model", "climodel:build_without_data", "--recipe", "w8a8-static",
                   "--state", "state", "--out", "b.onnx")
    assert run.returncode == 0 and "2 of 2 linears quantized" in run.stdout, run.stdout + run.stderr
    run = qcompile("export", "--model", "climodel:build_without_data", "--recipe", "w8a8-static",
                   "--state", "nowhere", "--out", "c.onnx")
    assert run.returncode == 2 and "not a qcompile artifact" in run.stderr, run.stderr


def test_loading_and_compiling_give_the_mapped_state_back(tmp_path, monkeypatch):
    """A loaded state's tensors are views of its mapped file, and reading one (hashing it) makes
    every page resident: ``load`` hands each back once read, and each prepared layer's float weight
    once sketched; a build hands back the rows and codes its graph read. (That the values read
    after this are the saved ones is the fresh-process round trip above.)"""
    model = _calibrated("w4a16-gptq")
    qcompiler.save(model, tmp_path, recipe="w4a16-gptq")
    released = []
    release = FilePages.release

    def recording(self, tensors):
        tensors = list(tensors)
        released.extend(t.data_ptr() for t in tensors if t.numel())
        return release(self, tensors)

    monkeypatch.setattr(FilePages, "release", recording)
    fresh, vocab = build("llama", seed=SEED)
    qcompiler.load(fresh, tmp_path)
    state = state_of(fresh)
    rows = {s.rows.data_ptr() for s in state.stats.values() if s.rows.numel()}
    codes = {p.weight.packed.data_ptr() for p in state.prepared.values()}
    weights = {m.weight.data_ptr() for name, m in linear_layers(fresh) if name in state.prepared}
    assert rows and codes and weights
    assert rows | codes | weights <= set(released)
    released.clear()
    fast = torch.compile(fresh, backend="qcompile", options={"recipe": "w4a16-gptq", "target": "reference"})
    with torch.no_grad():
        assert torch.isfinite(fast(**token_batch(vocab, **BATCH)).logits).all()
    assert rows | codes <= set(released)
