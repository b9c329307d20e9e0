"""ONNX lowering, export, conformance checker and the ``ort`` target.

Per q-op: ONNX Runtime runs each q-op's translation (both forms) on fresh random inputs and
must give the reference q-op's result (the same integer math; only float32 rounding differs).
Per recipe: the exported Stack model against the reference graph and against FP32.
"""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from torch import nn

import qcompiler
from conftest import rel_err
from models import QOp, Stack, with_outlier_channels
from qcompiler.deploy import onnx_check
from qcompiler.ir import int4, ops
from qcompiler.lowering.onnx import UnsupportedForm, to_onnx
from qcompiler.passes.sqnr import sqnr_db
from qcompiler.runtimes.ort_session import OrtSession

qops = torch.ops.qcompile
FP8 = ops.FP8


CASES = [  # (kind, qdtype, forms)
    ("dynamic", torch.int8, ["ort"]),
    ("dynamic", FP8, ["ort"]),
    ("static", torch.int8, ["tensorrt", "ort"]),
    ("static", FP8, ["tensorrt", "ort"]),
    ("w8a16", torch.int8, ["tensorrt", "ort"]),
    ("w4a16", None, ["tensorrt", "ort"]),
]


def _run(model, *xs):
    return OrtSession(model)(*xs)[0]


@pytest.mark.parametrize("kind,qdtype,forms", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("n,k", [(64, 32), (48, 100)])
@pytest.mark.parametrize("smooth", [False, True])
def test_each_qop_translation_matches_the_reference(kind, qdtype, forms, n, k, smooth):
    if smooth and kind not in ("dynamic", "static", "w4a16"):
        pytest.skip("no smoothing input on this q-op")
    torch.manual_seed(n + k)
    for form in forms:
        for symmetric in ([True, False] if kind == "w4a16" else [True]):
            m = QOp(kind, n, k, qdtype or torch.int8, group=32, symmetric=symmetric, smooth=smooth)
            x = torch.randn(3, 5, k)
            proto = to_onnx(m, (x,), form)
            x2 = torch.randn(2, 7, k)  # a new batch and sequence: dynamic dimensions
            for xi in (x, x2):
                ref, out = m(xi), _run(proto, xi)
                exact = torch.float64  # error measured against a float64 view of the reference
                assert out.shape == ref.shape
                assert rel_err(out.to(exact), ref.to(exact)) < 2e-6, (form, symmetric)
            if form == "tensorrt":
                found = {v.rule for v in onnx_check.check(proto)}
                # TensorRT's INT4 is symmetric: an asymmetric export runs, and is reported
                assert found == (set() if symmetric else {"zero-point-type"}), (kind, qdtype)


def test_ort_form_carries_int8_as_uint8_for_exact_u8u8_kernels():
    m = QOp("dynamic", 64, 384)
    proto = to_onnx(m, (torch.randn(2, 4, 384),), "ort")
    ops_used = {n.op_type for n in proto.graph.node}
    assert "MatMulIntegerToFloat" in ops_used and "MatMul" not in ops_used  # the integer GEMM
    weights = [t for t in proto.graph.initializer if t.data_type == T.UINT8 and len(t.dims) == 2]
    assert weights and list(weights[0].dims) == [384, 64]   # [K, N] as MatMul reads it
    # full-range activations: a u8 x s8 kernel would saturate here; the u8 x u8 one must not
    x = torch.randn(2, 16, 384) * 4
    assert rel_err(_run(proto, x).double(), m(x).double()) < 2e-6


@pytest.mark.parametrize("kind", ["dynamic", "blocks", "w8a16", "w4a16", "static"])
def test_nan_input_never_passes_silently(kind):
    """A NaN in one row: the other rows as the reference computes them, and the NaN row NaN on
    ONNX Runtime as in the reference. A static q-op alone is the exception, on every target: its
    calibrated scale saturates a NaN to a finite code (the reference's and ORT's codes differ), so
    the graph carries the fault around it (tests/integration/test_changes.py checks the whole model
    on every target and in exported files)."""
    torch.manual_seed(0)
    m = QOp(kind, 32, 32)
    proto = to_onnx(m, (torch.randn(2, 32),), "ort")
    x = torch.randn(2, 32)
    x[0, 3] = float("nan")
    out, ref = _run(proto, x), m(x)
    # blocks at dynamic rows run the two per-token passes (tests/unit/test_linear_blocks.py)
    ran = ops.linear_w8a8_two_pass_ref(x, m.inv, m.wq, m.ws, m.bias, torch.float32) if kind == "blocks" else ref
    assert rel_err(out[1:], ran[1:]) < 1e-5
    if kind == "static":
        assert torch.isfinite(out[0]).all() and torch.isfinite(ref[0]).all()
    else:
        assert out[0].isnan().all() and ref[0].isnan().all(), (out[0], ref[0])
    with pytest.raises(AssertionError):
        rel_err(torch.full((2,), float("nan")), torch.ones(2))


def test_tensorrt_form_refuses_dynamic_activations_with_the_fix_in_the_message():
    with pytest.raises(UnsupportedForm, match="static recipe"):
        to_onnx(QOp("dynamic", 16, 16), (torch.randn(2, 16),), "tensorrt")


# ----------------------------------------------------------------------------- whole models

RECIPES = ["w8a8", "w8a8-blocks", "w8a8-static", "w8a8-smoothquant", "w8a8-smoothquant-dynamic", "w8a16", "fp8", "fp8-static",
           "w4a16", "w4a16-awq", "w4a16-gptq"]
STATIC = {"w8a8-static", "w8a8-smoothquant", "fp8-static", "w8a16", "w4a16", "w4a16-awq", "w4a16-gptq"}
# dynamic rows of w8a8-blocks run two per-token int8 passes, finer than the reference's blocks
# (tests/unit/test_linear_blocks.py checks them against their own reference)
FINER_THAN_REFERENCE = {"w8a8-blocks"}
MIN_SQNR = {"w8a8": 30, "w8a8-blocks": 30, "w8a8-static": 25, "w8a8-smoothquant": 25, "w8a8-smoothquant-dynamic": 30, "w8a16": 35,
            "fp8": 25, "fp8-static": 22, "w4a16": 17, "w4a16-awq": 20, "w4a16-gptq": 20}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_exports_and_runs_in_onnx_runtime(recipe, tmp_path):
    torch.manual_seed(0)
    model = Stack(d=64, h=96).eval()
    batches = [with_outlier_channels(torch.randn(2, 16, 64)) for _ in range(4)]
    x = with_outlier_channels(torch.randn(2, 9, 64))
    opts = {"group_size": 32} if recipe.startswith("w4a16") else {}
    qcompiler.calibrate(model, batches, recipe={"recipe": recipe, **opts}, progress=False)
    ref_q = torch.compile(model, backend="qcompile", options={"recipe": recipe, **opts, "target": "reference"})(x)
    forms = ["ort"] + (["tensorrt"] if recipe in STATIC else [])
    for form in forms:
        result = qcompiler.export_onnx(model, (x,), str(tmp_path / f"{form}.onnx"), recipe=recipe, form=form,
                                       options=opts)
        assert result.violations == [], [str(v) for v in result.violations]
        for xi in (x, with_outlier_channels(torch.randn(3, 5, 64))):
            out = OrtSession(result.path)(xi)[0]
            ref = ref_q if xi is x else torch.compile(model, backend="qcompile", options={
                "recipe": recipe, **opts, "target": "reference"}, dynamic=True)(xi)
            if recipe in FINER_THAN_REFERENCE:  # closer to FP32 than the reference
                assert sqnr_db(model(xi), out) > sqnr_db(model(xi), ref), form
            else:
                assert rel_err(out, ref) < 1e-5, form
            assert sqnr_db(model(xi), out) > MIN_SQNR[recipe], form
        quantized = sum(d.scheme != "floating point" for d in result.decisions)
        assert quantized >= 8, f"{recipe}: only {quantized} linears quantized"


def test_export_of_an_fp32_model_needs_no_checker_findings_and_keeps_sizes(tmp_path):
    torch.manual_seed(0)
    model = Stack(d=64, h=96).eval()
    x = torch.randn(2, 9, 64)
    w8 = qcompiler.export_onnx(model, (x,), str(tmp_path / "w8.onnx"), recipe="w8a16")
    w4 = qcompiler.export_onnx(model, (x,), str(tmp_path / "w4.onnx"), recipe="w4a16", options={"group_size": 32})
    assert w4.file_bytes < w8.file_bytes
    assert "clean" in w8.summary()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form,recipe", [("tensorrt", "w8a8-smoothquant"), ("ort", "w8a8"), ("ort", "w4a16")])
def test_half_precision_models_export_with_their_dtype_at_the_interface(tmp_path, dtype, form, recipe):
    torch.manual_seed(0)
    model = Stack(d=64, h=96).eval().to(dtype)
    batches = [with_outlier_channels(torch.randn(2, 16, 64)).to(dtype) for _ in range(2)]
    x = with_outlier_channels(torch.randn(2, 9, 64)).to(dtype)
    opts = {"group_size": 32} if recipe == "w4a16" else {}
    result = qcompiler.export_onnx(model, (x,), str(tmp_path / "m.onnx"), recipe=recipe, form=form,
                                   calibration=batches, options=opts)
    assert not result.violations, [str(v) for v in result.violations]
    assert next(p for p in model.parameters()).dtype == dtype  # the model is not modified
    proto = onnx.load(result.path)
    want = {torch.float16: T.FLOAT16, torch.bfloat16: T.BFLOAT16}[dtype]
    assert [v.type.tensor_type.elem_type for v in proto.graph.input] == [want]
    assert [v.type.tensor_type.elem_type for v in proto.graph.output] == [want]
    for xi in (x, with_outlier_channels(torch.randn(3, 5, 64)).to(dtype)):
        out = OrtSession(result.path)(xi)[0]
        assert out.dtype == dtype
        ref = copy_float(model)(xi.float())
        assert sqnr_db(ref, out.float()) > MIN_SQNR.get(recipe, 15) - 3


def copy_float(model):
    import copy

    return copy.deepcopy(model).float()


def test_a_model_mixing_float_dtypes_is_refused_naming_them(tmp_path):
    model = Stack(d=64, h=96).eval()
    model.lm_head.half()
    with pytest.raises(qcompiler.ExportError, match="mixes torch.float16, torch.float32"):
        qcompiler.export_onnx(model, (torch.randn(2, 9, 64),), str(tmp_path / "m.onnx"), recipe="w8a16")


# ----------------------------------------------------------------------------- the checker


def _model(nodes, inits, opset=21, inputs=("x",)):
    return h.make_model(h.make_graph(nodes, "g", [h.make_tensor_value_info(i, T.FLOAT, None) for i in inputs],
                                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits),
                        opset_imports=[h.make_opsetid("", opset)])


def _qdq_linear(zp_act=np.int8(0), act_scale=np.float32(0.1), w_axis=1, opset=21, w_zp=None):
    w = np.random.default_rng(0).integers(-127, 128, (8, 4)).astype(np.int8)
    inits = [nh.from_array(w, "w"), nh.from_array(np.full(4, 0.01, np.float32), "ws"),
             nh.from_array(np.asarray(act_scale), "xs"), nh.from_array(np.asarray(zp_act), "xz"),
             nh.from_array(np.zeros(4, np.int8) if w_zp is None else w_zp, "wz")]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             h.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=w_axis, name="wdq"),
             h.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    return _model(nodes, inits, opset)


def _rules(model):
    return {v.rule for v in onnx_check.check(model)}


def test_checker_accepts_the_explicit_quantization_form():
    assert onnx_check.check(_qdq_linear()) == []


@pytest.mark.parametrize("planted,rule", [
    (dict(zp_act=np.uint8(128)), "zero-point-type"),
    (dict(zp_act=np.int8(3)), "zero-point-value"),
    (dict(act_scale=np.full(8, 0.1, np.float32)), "activation-per-tensor"),
    (dict(act_scale=np.float32(-0.1)), "scale-value"),
    (dict(w_axis=0, w_zp=np.zeros(8, np.int8)), "weight-axis"),
    (dict(opset=10), "opset"),
])
def test_checker_catches_planted_violations(planted, rule):
    model = _qdq_linear(**planted)
    if rule == "weight-axis":  # scales sized for axis 0
        for t in model.graph.initializer:
            if t.name == "ws":
                t.CopyFrom(nh.from_array(np.full(8, 0.01, np.float32), "ws"))
    assert rule in _rules(model)


def test_checker_catches_runtime_scales_lone_q_and_integer_ops():
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dql"),
             h.make_node("QuantizeLinear", ["x", "s"], ["q"], name="lone_q"),
             h.make_node("MatMulInteger", ["xq", "w"], ["y"], name="mmi")]
    model = _model(nodes, [nh.from_array(np.int8([[1]]), "w"), nh.from_array(np.float32(0.1), "s")])
    assert {"op", "placement", "zero-point-type"} <= _rules(model)


def _weight_through(layout: str, w_axis: int, unsigned: bool = False):
    """x (Q/DQ) @ a [N, K] int8 weight's DequantizeLinear read through ``layout``:
    "transpose" (Transpose to [K, N]) or "reshape" (Reshape to [K, N]); the activation scale is a
    ``Constant`` node in its ``value_float`` form."""
    w = np.random.default_rng(0).integers(-127, 128, (4, 8)).astype(np.uint8 if unsigned else np.int8)
    inits = [nh.from_array(w, "w"), nh.from_array(np.full(w.shape[w_axis], 0.01, np.float32), "ws"),
             nh.from_array(np.int8(0), "xz"), nh.from_array(np.int64([8, 4]), "shape")]
    nodes = [h.make_node("Constant", [], ["xs"], value_float=0.1, name="xs_const"),
             h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=w_axis, name="wdq"),
             h.make_node("Transpose", ["wd"], ["wt"], perm=[1, 0], name="t") if layout == "transpose" else
             h.make_node("Reshape", ["wd", "shape"], ["wt"], name="r"),
             h.make_node("MatMul", ["xd", "wt"], ["y"], name="mm")]
    return _model(nodes, inits)


def test_checker_reads_constant_nodes_and_follows_a_transpose_to_the_consumer():
    # [N, K] weight per channel on axis 0, transposed to [K, N]: MatMul reads N on axis 1 -> valid
    assert onnx_check.check(_weight_through("transpose", w_axis=0)) == []


@pytest.mark.parametrize("model,rule", [
    (lambda: _weight_through("transpose", w_axis=1), "weight-axis"),        # scales per K, not per N
    (lambda: _weight_through("reshape", w_axis=0), "weight-layout"),        # axis unverifiable
    (lambda: _weight_through("transpose", w_axis=0, unsigned=True), "zero-point-type"),  # uint8, no zp
])
def test_checker_catches_weights_read_through_layout_ops_and_unsigned_weights(model, rule):
    assert rule in _rules(model())


def test_checker_walks_subgraphs_and_functions():
    lone_q = h.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="lone_q_in_branch")
    branch = h.make_graph([lone_q, h.make_node("Identity", ["x"], ["y_b"])], "branch", [],
                          [h.make_tensor_value_info("y_b", T.FLOAT, None)])
    cond = h.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch, name="if")
    func = h.make_function("local", "f", ["a", "b"], ["o"], [h.make_node("MatMulInteger", ["a", "b"], ["o"])],
                           [h.make_opsetid("", 21)])
    call = h.make_node("f", ["x", "x"], ["unused"], domain="local", name="call_f")
    model = h.make_model(h.make_graph([cond, call], "g", [h.make_tensor_value_info("x", T.FLOAT, None),
                                                        h.make_tensor_value_info("c", T.BOOL, [])],
                                      [h.make_tensor_value_info("y", T.FLOAT, None)],
                                      [nh.from_array(np.float32(0.1), "s"), nh.from_array(np.int8(0), "z")]),
                         opset_imports=[h.make_opsetid("", 21), h.make_opsetid("local", 1)], functions=[func])
    found = {(v.rule, v.node) for v in onnx_check.check(model)}
    assert ("placement", "lone_q_in_branch") in found   # inside the If's bodies
    assert ("op", "MatMulInteger") in found               # inside the function


def test_cli_check_reports_findings_and_exit_codes(tmp_path, capsys):
    from qcompiler.api.cli import main

    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_qdq_linear(), good)
    onnx.save(_qdq_linear(zp_act=np.uint8(128)), bad)
    assert main(["check", str(good)]) == 0
    assert main(["check", str(bad)]) == 1
    assert "zero-point-type" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the ort target


def test_ort_target_exports_once_for_dynamic_shapes(monkeypatch):
    from qcompiler.lowering import ort

    exports = []
    real = ort.export_ir
    monkeypatch.setattr(ort, "export_ir", lambda *a, **k: exports.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = Stack().eval()
    fast = torch.compile(model, backend="qcompile", options={"target": "ort"})
    # the 2nd shape recompiles dynamic; then no export (a size-1 dimension would be a new graph:
    # Dynamo specializes sizes 0 and 1)
    for b, t in [(2, 8), (3, 17), (5, 4), (4, 33)]:
        x = torch.randn(b, t, 48)
        assert sqnr_db(model(x), fast(x)) > 30
    assert len(exports) == 2  # the static first graph, then the dynamic one
    assert {g.running for g in qcompiler.explain(fast).graphs} == {"ort"}


@pytest.mark.parametrize("damage", ["truncated file", "truncated weights", "no weights"])
def test_ort_target_keeps_exported_files_for_later_processes(monkeypatch, damage):
    """A later process (here: the in-memory sessions dropped) compiling the same quantized model reads
    the exported file and its side file of weights back instead of exporting; a damaged or
    incomplete pair is exported again."""
    from qcompiler.lowering import ort

    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(2, 8, 48)
    want = torch.compile(model, backend="qcompile", options={"target": "ort"})(x)
    kept = list(ort.cache_folder("onnx").glob("*.onnx"))
    data = kept[0].with_name(kept[0].name + ".data")
    assert len(kept) == 1 and onnx.load(str(kept[0])).graph.node
    assert data.stat().st_size > 48 * 48  # the weights are in the side file
    assert sorted(p.name for p in kept[0].parent.iterdir()) == sorted([kept[0].name, data.name])  # no temp left
    exports = []
    real = ort.export_ir
    monkeypatch.setattr(ort, "export_ir", lambda *a, **k: exports.append(1) or real(*a, **k))
    for damaged in (False, True):
        if damaged and damage == "truncated file":
            kept[0].write_bytes(kept[0].read_bytes()[:100])
        elif damaged and damage == "truncated weights":
            data.write_bytes(data.read_bytes()[:100])
        elif damaged:
            data.unlink()
        monkeypatch.setattr(ort, "_SESSIONS", {})
        torch._dynamo.reset()
        got = torch.compile(model, backend="qcompile", options={"target": "ort"})(x)
        assert torch.equal(got, want)
        assert len(exports) == int(damaged)
    assert onnx.load(str(kept[0])).graph.node and data.stat().st_size > 48 * 48  # replaced


def test_ort_target_runs_when_the_cache_cannot_be_written(monkeypatch):
    """A full or read-only cache folder never fails the compile, nor exports twice: the session
    takes the graph from memory."""
    from onnxscript import ir

    from qcompiler.lowering import ort

    torch.manual_seed(0)
    model, x = Stack().eval(), torch.randn(2, 8, 48)
    want = torch.compile(model, backend="qcompile", options={"target": "reference"})(x)

    def full_disk(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", full_disk)
    exports, real = [], ort.export_ir
    monkeypatch.setattr(ort, "export_ir", lambda *a, **k: exports.append(1) or real(*a, **k))
    torch._dynamo.reset()
    got = torch.compile(model, backend="qcompile", options={"target": "ort"})(x)
    assert rel_err(got, want) < 1e-5
    assert len(exports) == 1
    assert list(ort.cache_folder("onnx").iterdir()) == []  # nothing half-written left


def test_ort_target_holds_the_quantized_weights_once():
    """Once a graph's session holds the quantized weights, the graph's own copies are released
    (shape-only meta tensors): results stay those of the reference, on new shapes too, and
    explain still reads the graph."""
    from qcompiler.api.backend import compiled_graphs

    torch.manual_seed(0)
    model = Stack().eval()
    fast = torch.compile(model, backend="qcompile", options={"target": "ort"})
    reference = torch.compile(model, backend="qcompile", options={"target": "reference"})
    for b, t in [(2, 8), (3, 17), (4, 5)]:
        x = torch.randn(b, t, 48)
        assert sqnr_db(reference(x), fast(x)) > 40
    graphs = compiled_graphs(fast)
    assert graphs and all(g.running_target == "ort" for g in graphs)
    for g in graphs:
        constants = list(g.graph_module._buffers.values())
        assert constants and all(c.device.type == "meta" for c in constants)
    # the model's own weights and buffers untouched
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert any(r.scheme == "w8a8" for r in qcompiler.explain(fast) if r.op == "linear")


def test_an_export_leaves_no_graph_behind():
    """The exporter's ONNX graph (with its copies of the weights) is freed after the export: the
    pattern rules, which live as long as the process, forget what they last matched."""
    import gc

    from onnxscript import ir

    from qcompiler.lowering.onnx_fusions import MATCHING_RULES

    def live_graphs():
        gc.collect()
        return sum(isinstance(o, ir.Graph) for o in gc.get_objects())

    m = QOp("dynamic", 64, 384)
    # the process's first export builds the exporter's own tables (graphs of its ONNX functions),
    # which live as long as the process: counted from after one
    to_onnx(m, (torch.randn(2, 4, 384),), "ort")
    before = live_graphs()
    proto = to_onnx(m, (torch.randn(2, 4, 384),), "ort")
    assert proto.graph.node
    assert live_graphs() == before
    assert all(getattr(getattr(rule, "_matcher", None), "_graph", None) is None for rule in MATCHING_RULES)


def test_freed_heap_memory_is_handed_back_where_the_c_library_can():
    import sys

    from qcompiler.runtimes.host_memory import return_freed_memory

    assert return_freed_memory(collect=True) is sys.platform.startswith("linux")


def test_disk_cache_keeps_the_most_recently_used_files(tmp_path):
    import os

    from qcompiler.runtimes.disk_cache import keep, touch

    for i, name in enumerate("abcd"):
        (tmp_path / name).write_bytes(b"x" * 100)
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    touch(tmp_path / "a")  # used just now: the newest
    keep(tmp_path, 250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"]


def test_ort_target_sessions_are_not_shared_between_recipes():
    """Two recipes of one model in one process give exactly what each gives in a process of its own.
    Each compile sees two shapes, so its second graph is the dynamic one whose session is cached
    (a cache keyed by less than the exported graph's content handed w8a8's session to w8a16)."""
    torch.manual_seed(0)
    model = Stack().eval()
    xs = [torch.randn(2, 8, 48), torch.randn(3, 17, 48), torch.randn(4, 5, 48)]
    outs = {}
    for recipe in ("w8a8", "w8a16", "w8a8"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": "ort"})
        outs.setdefault(recipe, []).append([fast(x) for x in xs])
    torch._dynamo.reset()
    for recipe in ("w8a8", "w8a16"):
        reference = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": "reference"})
        for x, got in zip(xs, outs[recipe][0]):
            assert sqnr_db(reference(x), got) > 40, recipe
    assert not torch.equal(outs["w8a8"][0][2], outs["w8a16"][0][2])
    assert all(torch.equal(a, b) for a, b in zip(outs["w8a8"][0], outs["w8a8"][1]))


def _graph_with_size_inputs(read_other: bool):
    """A Dynamo-shaped graph: SymInt placeholders ``length`` (x's dim 1) and ``other`` (no tensor
    measures it), then x; returns ``x * length`` (+ ``other`` when ``read_other``)."""
    from torch import fx
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sym = lambda name, hint: env.create_symintnode(env.create_symbol(hint, ConstantSource(name)), hint=hint)
    length, other = sym("length", 8), sym("other", 5)
    with FakeTensorMode(shape_env=env):
        fake = torch.empty(2, length)
    g = fx.Graph()
    nodes = [g.placeholder("s_other"), g.placeholder("s_len"), g.placeholder("x")]
    for node, value in zip(nodes, [other, length, fake]):
        node.meta["example_value"] = value
    y = g.call_function(torch.mul, (nodes[2], nodes[1]))
    if read_other:
        y = g.call_function(torch.add, (y, nodes[0]))
    g.output((y,))
    return fx.GraphModule(nn.Module(), g), [5, 8, torch.randn(2, 8)]


def test_freeze_recomputes_sizes_drops_unread_ones_and_names_the_rest():
    from qcompiler.lowering.onnx import freeze

    # a KV-cache decode step after a prefill: Dynamo passes a size the graph never reads
    frozen, feeds, fed = freeze(*_graph_with_size_inputs(read_other=False))
    assert fed == [2] and [n.op for n in frozen.graph.nodes].count("placeholder") == 1
    x = torch.randn(2, 3)  # the size is re-measured on the new input, not frozen at 8
    torch.testing.assert_close(frozen(x)[0], x * 3)
    with pytest.raises(UnsupportedForm, match="s_other .* not a tensor size"):
        freeze(*_graph_with_size_inputs(read_other=True))
    frozen, feeds, fed = freeze(*_graph_with_size_inputs(read_other=True), pinned={0: 5})
    torch.testing.assert_close(frozen(x)[0], x * 3 + 5)


class _LastLogits(nn.Module):
    """A head that keeps the last ``keep`` positions: an int argument no tensor size measures."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 48)

    def forward(self, x, keep: int):
        return self.proj(x[:, -keep:, :])


def test_ort_target_takes_an_int_argument_dynamo_made_symbolic():
    """Under dynamic=True an int argument (transformers' ``logits_to_keep``) is a symbolic graph
    input: the exported file takes it as a constant, and another value gets its own session."""
    torch.manual_seed(0)
    model = _LastLogits().eval()
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": "ort"}, dynamic=True)
    ref = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "target": "reference"}, dynamic=True)
    for length, keep in ((7, 1), (9, 3), (5, 1), (6, 4)):
        x = torch.randn(2, length, 32)
        out = fast(x, keep)
        assert out.shape == (2, keep, 48)
        assert rel_err(out, ref(x, keep)) < 1e-5
    running = {g.running for g in qcompiler.explain(fast).graphs}
    assert running == {"ort"}, qcompiler.explain(fast).graphs


class _SelfAttention(nn.Module):
    def forward(self, x):  # x: [B, H, T, D]
        return nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


def test_ort_form_runs_attention_as_one_fused_op():
    x = torch.randn(2, 3, 5, 8)
    proto = to_onnx(_SelfAttention(), (x,), "ort")
    assert [n.op_type for n in proto.graph.node].count("Attention") == 1
    assert not {"Softmax", "Where"} & {n.op_type for n in proto.graph.node}
    torch.testing.assert_close(_run(proto, x), _SelfAttention()(x), rtol=1e-5, atol=1e-5)


class _ProjectedAttention(nn.Module):
    """Encoder-style attention: [B, S, E] projections split into heads, SDPA, heads merged."""

    def __init__(self, heads: int, head_dim: int, split_last: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.split_last = heads, head_dim, split_last
        self.qkv = nn.ModuleList(nn.Linear(heads * head_dim, heads * head_dim) for _ in range(3))

    def forward(self, x, mask):
        b, s, _ = x.shape
        if self.split_last:
            q, k, v = (p(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in self.qkv)
        else:  # heads interleaved along E: not a split of the last dimension into (heads, size)
            q, k, v = (p(x).view(b, s, self.head_dim, self.heads).permute(0, 3, 1, 2) for p in self.qkv)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :].expand(b, 1, s, s))
        return out.transpose(1, 2).reshape(b, s, -1)


@pytest.mark.parametrize("heads,head_dim", [(2, 8), (3, 4)])
@pytest.mark.parametrize("split_last", [True, False])
def test_ort_form_feeds_attention_the_projections_without_transposes(heads, head_dim, split_last):
    torch.manual_seed(0)
    model = _ProjectedAttention(heads, head_dim, split_last).eval()
    x, mask = torch.randn(2, 5, heads * head_dim), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    proto = to_onnx(model, (x, mask), "ort")
    attention = [n for n in proto.graph.node if n.op_type == "Attention"]
    assert len(attention) == 1
    attrs = {a.name: a.i for a in attention[0].attribute}
    transposes = [n.op_type for n in proto.graph.node].count("Transpose")
    if split_last:  # the 3-D form: heads given as attributes, no layout ops left around it
        assert (attrs.get("q_num_heads"), attrs.get("kv_num_heads"), transposes) == (heads, heads, 0)
    else:  # a different layout: the rule must not fire
        assert "q_num_heads" not in attrs and transposes >= 4
    torch.testing.assert_close(_run(proto, x, mask), model(x, mask), rtol=1e-5, atol=1e-5)


def test_ort_sessions_do_not_busy_wait_between_runs():
    # workers spinning after a run starve torch's threads, generate()'s Python and the other graphs'
    # sessions; inside a run the spinning pays (docs/results/ort_spinning.md)
    from qcompiler.runtimes.ort_session import session_options

    so = session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    assert so.get_session_config_entry("session.disable_quant_qdq") == "1"
    assert so.get_session_config_entry("session.set_denormal_as_zero") == "1"  # runtimes/denormals.py


@pytest.mark.parametrize("target", ["auto", "ort"])
def test_ort_export_failure_falls_back_only_under_auto(monkeypatch, target):
    from qcompiler.lowering import ort

    def broken(*a, **k):
        raise RuntimeError("planted exporter failure")
    monkeypatch.setattr(ort, "export_ir", broken)
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(2, 8, 48)
    fast = torch.compile(model, backend="qcompile", options={"target": target})
    if target == "ort":  # an explicit target is a contract: the error names why and the fix
        with pytest.raises(Exception, match=r"target 'ort' cannot run this graph.*planted exporter failure"):
            fast(x)
        return
    with pytest.warns(UserWarning, match="planted exporter failure"):
        out = fast(x)
    assert sqnr_db(model(x), out) > 30
    (graph,) = qcompiler.explain(fast).graphs
    assert (graph.requested, graph.running) == ("auto", "inductor")
    assert "planted exporter failure" in graph.reason


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "bert"])
def test_optimizer_equals_onnxscripts_own_less_the_quadratic_rule(monkeypatch, arch):
    """``onnx_fusions.optimize`` runs onnxscript's ``optimize_ir`` passes without ``SlicesSplit``
    (pairwise matching, minutes on a real model): on real architectures the graphs come out the
    same, op for op, and compute the same values."""
    from collections import Counter

    import onnxscript.optimizer
    from tiny_models import build, token_batch
    from qcompiler.lowering import onnx_fusions

    model, vocab = build(arch)
    model.config.use_cache = False
    ids = token_batch(vocab, 2, 7)["input_ids"]
    ours = to_onnx(model, (ids,), "ort")
    monkeypatch.setattr(onnx_fusions, "_optimizer", lambda: onnxscript.optimizer.optimize_ir)
    library = to_onnx(model, (ids,), "ort")
    assert Counter(n.op_type for n in ours.graph.node) == Counter(n.op_type for n in library.graph.node)
    assert len(ours.graph.initializer) == len(library.graph.initializer)
    torch.testing.assert_close(_run(ours, ids), _run(library, ids), rtol=0, atol=0)


@pytest.mark.parametrize("recipe,gemm", [("w8a8", "MatMulIntegerToFloat"), ("w4a16", "MatMulNBits")])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "bert"])
def test_ort_form_merges_the_gemms_that_read_one_activation(monkeypatch, tmp_path, arch, recipe, gemm):
    """q/k/v (and gate/up) read one activation: the ORT form runs them as one GEMM
    (``MatMulIntegerToFloat``, ``MatMulNBits``) and a ``Split``, and computes exactly what the
    separate GEMMs do."""
    from collections import Counter

    from tiny_models import build, token_batch
    from qcompiler.lowering import onnx_fusions

    model, vocab = build(arch)
    paths, counts = {}, {}
    for merged in (True, False):
        if not merged:
            monkeypatch.setitem(onnx_fusions.GRAPH_FUSIONS, "ort", [])
        path = str(tmp_path / f"{merged}.onnx")
        qcompiler.export_onnx(model, token_batch(vocab, 2, 7), path, recipe=recipe, form="ort")
        paths[merged] = path
        counts[merged] = Counter(n.op_type for n in onnx.load(path).graph.node)
    layers = model.config.num_hidden_layers
    # separate: one GEMM per linear; merged: q/k/v one GEMM per layer (and gate/up, where separate)
    fused_qkv = arch == "phi3"  # Phi-3 has qkv_proj and gate_up_proj already
    saved = 0 if fused_qkv else layers * (2 + (arch != "bert"))
    assert counts[True][gemm] == counts[False][gemm] - saved
    assert counts[True]["Split"] - counts[False]["Split"] == (0 if fused_qkv else layers * (1 + (arch != "bert")))
    sessions = {merged: OrtSession(path) for merged, path in paths.items()}
    for shape in ((2, 7), (1, 1), (3, 12)):
        batch = token_batch(vocab, *shape, seed=shape[1])
        outs = {m: s(*(batch[name] for name in s.input_names))[0] for m, s in sessions.items()}
        torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)


def test_a_session_call_never_overwrites_the_tensors_an_earlier_call_returned():
    """Outputs are handed to torch without a copy: a later run must not write into them (a decode
    step's KV cache is an earlier step's output)."""
    graph = h.make_graph([h.make_node("Mul", ["x", "x"], ["y"])], "g", [h.make_tensor_value_info("x", T.FLOAT, [None, 4])],
                         [h.make_tensor_value_info("y", T.FLOAT, [None, 4])])
    session = OrtSession(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    first = session(torch.ones(2, 4))[0]
    second = session(torch.full((2, 4), 3.0))[0]
    assert torch.equal(first, torch.ones(2, 4)) and torch.equal(second, torch.full((2, 4), 9.0))


class _TiedLM(nn.Module):
    """A 1 MiB embedding table that a tied output projection reads again transposed, with a linear
    between them for the recipe to quantize."""

    def __init__(self, vocab: int = 2048, dim: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.embed(ids))))


def test_ort_sessions_read_large_float_parameters_from_the_model():
    """A float table of 1 MiB or more is an input of the session bound to the model's own memory,
    not a constant of its file (no copy per session, none transposed): results match the
    reference, on a new shape too, and follow an in-place change of the table."""
    from qcompiler.api.backend import compiled_graphs

    torch.manual_seed(0)
    model = _TiedLM().eval()
    fast = torch.compile(model, backend="qcompile", options={"target": "ort", "recipe": "w8a8"})
    reference = torch.compile(model, backend="qcompile", options={"target": "reference", "recipe": "w8a8"})
    for shape in [(2, 7), (3, 11)]:
        ids = torch.randint(0, 2048, shape)
        assert sqnr_db(reference(ids), fast(ids)) > 40
    graphs = [g for g in compiled_graphs(fast) if g.running_target == "ort"]
    assert graphs
    table = model.embed.weight.numel()
    for g in graphs:
        session = g.fn.session
        assert len(session.parameter_names) == 1
        sizes = [math.prod(t.dims) for t in session.graph.graph.initializer]
        assert sizes and max(sizes) < table  # neither the table nor its transpose is stored
        assert "1 x MatMul, float weights read in place from the model's parameters" in g.fn.kernel_lines()
    with torch.no_grad():
        model.embed.weight.mul_(-0.5)
    ids = torch.randint(0, 2048, (2, 7))
    assert sqnr_db(reference(ids), fast(ids)) > 40
    with torch.no_grad():
        want = model(ids)
    assert sqnr_db(want, fast(ids)) > 25


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile"))


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux's")
def test_pages_of_mapped_weights_can_go_and_come_back_unchanged(tmp_path):
    """``FilePages.release``: a tensor mapped from a file gives its resident pages back (the
    process's file-backed resident set falls), its values read the same afterwards, a page the
    process wrote keeps its new value, and a tensor in anonymous memory is left alone."""
    import os

    from qcompiler.runtimes.host_memory import FilePages

    n = 16 * 2**20 // 4
    path = tmp_path / "weights.bin"
    with open(path, "wb") as f:
        np.random.default_rng(0).standard_normal(n, dtype=np.float32).tofile(f)
        f.flush()
        os.fsync(f.fileno())
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private, copy on write
    stored = torch.from_numpy(np.fromfile(path, dtype=np.float32))
    assert torch.equal(mapped, stored)  # reads every page in
    mapped[0] = 1e6  # this page is now the process's own
    before = _rss_file_bytes()
    assert FilePages().release([mapped]) >= 15 * 2**20
    assert _rss_file_bytes() < before - 8 * 2**20
    assert mapped[0] == 1e6 and torch.equal(mapped[1:], stored[1:])
    assert FilePages().release([torch.randn(2**20)]) == 0
    assert FilePages().release([mapped, torch.randn(2**20)]) >= 15 * 2**20  # one read of the mappings, many tensors
