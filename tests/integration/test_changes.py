"""No wrong result when the model's inputs, weights or mode, or the process, change after compiling.

Each behaviour on every target it applies to (reference, inductor, ort, triton under the CPU
interpreter) and on the exported ONNX files: a NaN or Inf input row stays non-finite; an in-place
weight change is followed (or, for weights GPTQ prepared, refused with the fix); training mode with
gradients runs the floating-point graph; an export leaves every submodule's mode as it was; the
ONNX file cache never serves a file exported for other shapes.
"""
import os
import warnings

import pytest
import torch
from torch import nn

import qcompiler
from conftest import rel_err

TARGETS = ["reference", "inductor", "ort"]
CALIBRATION = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


def compiled(model, recipe, target, **kw):
    if qcompiler.get_recipe(recipe).needs_calibration or recipe.endswith("static") or "smoothquant" in recipe:
        qcompiler.calibrate(model, CALIBRATION, progress=False)
    return torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": target}, **kw)


def bad_rows(y):
    return (~torch.isfinite(y.float())).any(dim=-1)


# ----------------------------------------------------------------------------- NaN / Inf rows

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w8a8-smoothquant", "fp8", "fp8-static", "w8a16", "w4a16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_input_row_stays_non_finite_and_the_others_right(target, recipe, value):
    model = mlp()
    fast = compiled(model, recipe, target)
    x = torch.randn(5, 32)
    x[2, 7] = value
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert bad_rows(want).tolist() == [False, False, True, False, False]
    assert bad_rows(got).tolist() == bad_rows(want).tolist()
    rows = ~bad_rows(want)
    assert rel_err(got[rows], want[rows]) < 0.1


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static"])
def test_a_nan_row_stays_nan_on_the_triton_kernels(recipe):
    pytest.importorskip("triton")
    model = mlp()
    fast = compiled(model, recipe, "triton")
    x = torch.randn(3, 32)
    x[1, 0] = float("nan")
    with torch.no_grad():
        assert bad_rows(fast(x)).tolist() == [False, True, False]


@pytest.mark.parametrize("recipe,form", [("w8a8", "ort"), ("w8a8-static", "ort"), ("w8a8-static", "tensorrt"),
                                         ("fp8", "ort")])
def test_a_nan_row_stays_nan_in_the_exported_file(tmp_path, recipe, form):
    import onnxruntime as ort

    model = mlp()
    if recipe.endswith("static"):
        qcompiler.calibrate(model, CALIBRATION, progress=False)
    path = str(tmp_path / "model.onnx")
    qcompiler.export_onnx(model, torch.randn(3, 32), path, recipe=recipe, form=form)
    x = torch.randn(3, 32)
    x[0, 5] = float("nan")
    session = ort.InferenceSession(path)
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert bad_rows(out).tolist() == [True, False, False]


# ----------------------------------------------------------------------------- weights changed after compiling

def _negate_first(model):
    with torch.no_grad():
        model[0].weight.mul_(-1)


def _load_other(model):
    model.load_state_dict(mlp(seed=7).state_dict())


def _optimizer_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 32)).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("change", [_negate_first, _load_other, _optimizer_step])
def test_weights_changed_in_place_after_compiling_are_followed(target, change):
    model = mlp()
    fast = compiled(model, "w8a8", target)
    x = torch.randn(6, 32)
    with torch.no_grad():
        before = fast(x)
    change(model)
    with torch.no_grad():
        got, want = fast(x), model(x)
    assert rel_err(want, before) > 0.1  # the change matters
    assert rel_err(got, want) < 0.05   # and the compiled model follows it


def test_weights_gptq_prepared_then_changed_are_refused_with_the_fix():
    model = mlp()
    qcompiler.calibrate(model, CALIBRATION, recipe={"recipe": "w4a16-gptq", "group_size": 16}, progress=False)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "group_size": 16,
                                                             "target": "reference"})
    x = torch.randn(3, 32)
    with torch.no_grad():
        fast(x)
        model[2].weight.mul_(2)
        with pytest.raises(qcompiler.CalibrationError, match=r"weights of 2 changed.*calibrate\(model"):
            fast(x)
    qcompiler.calibrate(model, CALIBRATION, recipe={"recipe": "w4a16-gptq", "group_size": 16}, progress=False)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 0.2  # prepared again from the new weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_compiled_model_moved_to_another_dtype_follows_it(dtype):
    model = mlp()
    fast = compiled(model, "w8a8", "inductor")
    x = torch.randn(3, 32)
    with torch.no_grad():
        fast(x)
        model.to(dtype)
        got, want = fast(x.to(dtype)), model(x.to(dtype))
    assert got.dtype == dtype and rel_err(got, want) < 0.05


# ----------------------------------------------------------------------------- training mode

@pytest.mark.parametrize("target", TARGETS)
def test_training_mode_with_gradients_runs_in_floating_point_and_says_so(target):
    model = mlp().train()
    fast = compiled(model, "w8a8", target)
    x = torch.randn(4, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = fast(x)
        fast(x)
    assert sum("training mode with gradients" in str(w.message) for w in caught) == 1
    assert torch.equal(y, model(x))   # the floating-point graph itself
    y.pow(2).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert "2 call(s) ran the floating-point graph" in str(qcompiler.explain(fast))
    # in eval mode, or under no_grad, the same model runs quantized
    model.eval()
    with torch.no_grad():
        q = fast(x)
    assert not q.requires_grad and not torch.equal(q, model(x))
    assert rel_err(q, model(x)) < 0.05


# ----------------------------------------------------------------------------- export and modes

class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(32, 16), nn.Dropout(0.5)).eval()

    def forward(self, x):
        return self.inner(x)


def test_export_leaves_every_submodule_in_its_mode_and_exports_the_inference_graph(tmp_path):
    import onnxruntime as ort

    model = Wrapper()  # a fresh wrapper is in training mode; the model inside it is not
    assert model.training and not model.inner.training
    path = str(tmp_path / "m.onnx")
    qcompiler.export_onnx(model, torch.randn(2, 32), path, recipe="w8a8", form="ort")
    assert model.training and not model.inner.training and not model.inner[1].training
    x = torch.randn(2, 32)
    session = ort.InferenceSession(path)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert rel_err(torch.from_numpy(out), model.inner(x)) < 0.05  # no dropout in the file


# ----------------------------------------------------------------------------- the ONNX file cache

def test_a_cached_onnx_file_is_never_run_on_shapes_it_was_not_exported_for():
    from qcompiler.lowering import ort

    model = mlp()
    for batch in (8, 4):  # each a fresh compile with static shapes, as a new process would make
        ort._SESSIONS.clear()
        torch._dynamo.reset()
        fast = compiled(model, "w8a8", "ort", dynamic=False)
        x = torch.randn(batch, 32)
        with torch.no_grad():
            assert rel_err(fast(x), model(x)) < 0.05
    folder = ort.cache_folder("onnx")
    assert len([f for f in os.listdir(folder) if f.endswith(".onnx")]) == 2  # one file per shape


def test_the_onnx_cache_key_names_static_sizes_dynamic_axes_and_versions():
    from qcompiler.lowering import ort

    eight, four = torch.zeros(8, 32), torch.zeros(4, 32)
    assert ort._feed_signature([eight], None) != ort._feed_signature([four], None)
    assert ort._feed_signature([eight], [{0: "batch"}]) == ort._feed_signature([four], [{0: "batch"}])
    assert ort._feed_signature([eight.half()], None) != ort._feed_signature([eight], None)
    assert "onnxruntime" in ort._versions()


@pytest.mark.parametrize("target", ["inductor", "ort"])
def test_a_dynamic_graph_whose_weights_changed_serves_every_size_after(target):
    model = mlp()
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": target}, dynamic=True)
    with torch.no_grad():
        fast(torch.randn(3, 5, 32))
        model[2].weight.mul_(-2)
        for shape in ((4, 3, 32), (2, 7, 32), (4, 3, 32)):
            x = torch.randn(*shape)
            assert rel_err(fast(x), model(x)) < 0.05


class _FloatAttributes(nn.Module):
    """An RMS norm and an output scale read from Python floats, as transformers' norms read ``eps``,
    and a float argument of the call: under ``dynamic=True`` Dynamo lifts floats to tensor inputs;
    the backend has it trace the module's as constants it guards by value, the argument stays an
    input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.eps, self.scale = nn.Linear(32, 16), 1e-6, 0.5

    def forward(self, x, shift: float = 0.0):
        return self.lin(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)) * self.scale + shift


@pytest.mark.parametrize("target", TARGETS)
def test_a_module_float_changed_after_compiling_is_followed(target, monkeypatch):
    """A module float is a constant Dynamo guards: a call after it changed runs a graph built for
    the new value (an ONNX export must take it as a constant), and a call that brings the same
    values builds nothing."""
    from qcompiler.api import backend
    from qcompiler.api.backend import compiled_graphs

    rebuilds = []
    rebuild = backend.CompiledGraph._rebuild
    monkeypatch.setattr(backend.CompiledGraph, "_rebuild", lambda self, args: (rebuilds.append(1), rebuild(self, args)))
    model = _FloatAttributes().eval()
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": target}, dynamic=True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        before = fast(x)
        assert rel_err(fast(torch.randn(2, 7, 32)), model(torch.randn(2, 7, 32))) >= 0 and not rebuilds
        model.eps, model.scale = 4.0, -3.0
        got, want = fast(x), model(x)
        assert rel_err(want, before) > 0.5  # the change matters
        assert rel_err(got, want) < 0.05  # and the compiled model follows it
        model.scale = float("nan")
        assert torch.isnan(fast(x)).all()
    graphs = compiled_graphs(fast)
    assert graphs and all(len(g.scalar_slots) == 1 for g in graphs)  # eps and scale are constants; shift is not


@pytest.mark.parametrize("target", TARGETS)
def test_a_float_argument_changed_between_calls_is_followed(target):
    """A float argument stays a tensor input under dynamic=True; a lowering that took it as a
    constant (an ONNX export) builds again for a new value, one that reads it follows it as is."""
    from qcompiler.api.backend import compiled_graphs

    model = _FloatAttributes().eval()
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": target}, dynamic=True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        for shift in (0.0, 0.0, 5.0, -2.5, float("nan")):
            got, want = fast(x, shift), model(x, shift)
            if shift != shift:
                assert torch.isnan(got).all()
            else:
                assert rel_err(got, want) < 0.05, shift
    assert any(g.scalar_slots for g in compiled_graphs(fast))  # the argument stayed an input



@pytest.mark.parametrize("target", TARGETS)
def test_changed_weights_of_a_graph_reading_module_floats_are_followed_at_every_size(target):
    """Built again outside Dynamo (weights changed in place), a graph cannot read the floats
    Dynamo lifted to tensors: it takes their values as constants, and still follows a later change
    of them and of the sizes."""
    model = _FloatAttributes().eval()
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": target}, dynamic=True)
    with torch.no_grad():
        fast(torch.randn(3, 5, 32))
        model.lin.weight.mul_(-2)
        for i, shape in enumerate(((3, 5, 32), (2, 7, 32), (4, 3, 32))):
            if i == 2:
                model.eps = 2.0
            x = torch.randn(*shape)
            assert rel_err(fast(x), model(x)) < 0.05, shape


# ----------------------------------------------------------------------------- prepared codes and changed weights

def _gptq(model):
    qcompiler.calibrate(model, CALIBRATION, recipe={"recipe": "w4a16-gptq", "group_size": 16}, progress=False)
    return torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "group_size": 16,
                                                             "target": "reference"})


def test_weights_changed_between_calibration_and_compiling_are_refused():
    model = mlp()
    fast = _gptq(model)
    model.load_state_dict(mlp(seed=3).state_dict())  # before the first call: nothing compiled yet
    with torch.no_grad(), pytest.raises(qcompiler.CalibrationError, match=r"weights of 0, 2 changed"):
        fast(torch.randn(2, 32))


@pytest.mark.parametrize("change", ["deepcopy", "bfloat16"])
def test_copies_and_dtype_moves_of_a_prepared_model_are_not_taken_for_changes(change):
    import copy

    model = mlp()
    qcompiler.calibrate(model, CALIBRATION, recipe={"recipe": "w4a16-gptq", "group_size": 16}, progress=False)
    dtype = torch.bfloat16 if change == "bfloat16" else torch.float32
    model = copy.deepcopy(model) if change == "deepcopy" else model.to(dtype)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "group_size": 16,
                                                             "target": "reference"})
    x = torch.randn(3, 32).to(dtype)
    with torch.no_grad():
        assert rel_err(fast(x), model(x)) < 0.2


def test_a_saved_state_is_refused_by_a_model_whose_weights_changed_since(tmp_path):
    model = mlp()
    _gptq(model)
    qcompiler.save(model, tmp_path / "state", recipe={"recipe": "w4a16-gptq", "group_size": 16})
    same = mlp()  # the same weights: loads
    qcompiler.load(same, tmp_path / "state")
    tuned = mlp()
    with torch.no_grad():
        tuned[0].weight.add_(0.05 * torch.randn_like(tuned[0].weight))  # a fine-tune of one layer
    with pytest.raises(qcompiler.InvalidFile, match=r"prepared from other weights than this model's for 0 "):
        qcompiler.load(tuned, tmp_path / "state")


def test_the_onnx_cache_key_covers_every_module_the_export_reads():
    """A change to the q-op constants (qcompiler/ir), a translation or a fusion is a new file name:
    an edited exporter never runs a file an older one wrote."""
    from qcompiler.lowering import ort

    files = {os.path.relpath(f, os.path.dirname(os.path.dirname(ort.__file__))) for f in ort.exporter_files()}
    assert {"qcompiler/ir/numerics.py", "qcompiler/ir/ops.py", "qcompiler/ir/attention.py", "lowering/onnx_ops.py",
            "lowering/onnx_fusions.py", "lowering/onnx_sibling_matmuls.py", "lowering/scalars.py",
            "lowering/onnx.py", "lowering/ort.py"} <= files, sorted(files)
