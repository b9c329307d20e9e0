"""The type-promotion check (``lowering.onnx_type_promotion``): it names a node exactly where the
exporter's own pass would insert a cast, on synthetic mixed-dtype graphs and on every tiny
architecture's q-op graph, and the direct export of a graph that needs casts stays correct."""
import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import qcompiler
import tiny_models
from qcompiler.lowering import onnx_translate, onnx_type_promotion
from qcompiler.lowering.onnx import to_onnx
from test_onnx_translate import NEEDS_DECOMPOSITION


def _pass_changes(gm) -> bool:
    """Whether the exporter's ``insert_type_promotion_nodes`` changes (a copy of) ``gm``'s graph."""
    steps = onnx_translate.internals().steps
    copied = copy.deepcopy(gm)
    before = str(copied.graph)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        steps.insert_type_promotion_nodes(copied)
    return str(copied.graph) != before


class IntPlusFloat(nn.Module):
    def forward(self, x, ids):
        return x + ids[..., None]                          # float32 + int64 tensor


class ScalarTimesInt(nn.Module):
    def forward(self, x, ids):
        return x.sum(-1) + ids * 0.5                       # int64 tensor times a Python float


class WhereScalar(nn.Module):
    def forward(self, x, ids):
        return torch.where(ids[..., None] > 2, x, 0)       # an int scalar beside a float tensor


class DivInts(nn.Module):
    def forward(self, x, ids):
        return x.mean(-1) * (ids / 3)                      # true division of integers


class SameDtypes(nn.Module):
    def forward(self, x, ids):
        return torch.relu(x * 2.0 + 1.0).sum(-1) + ids.float()


MODULES = {"int-plus-float": (IntPlusFloat, True), "scalar-times-int": (ScalarTimesInt, True),
           "where-scalar": (WhereScalar, None), "div-ints": (DivInts, True), "same-dtypes": (SameDtypes, False)}


def _inputs(batch=2, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 8, generator=g), torch.randint(0, 6, (batch, length), generator=g)


def _program(module, inputs):
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) * 2
    return onnx_translate.capture(module, inputs, None, dims)


@pytest.mark.parametrize("name", list(MODULES))
def test_check_agrees_with_the_exporters_pass(name):
    cls, expected = MODULES[name]
    gm = _program(cls(), _inputs()).graph_module
    found = onnx_type_promotion.promotions(gm)
    changes = _pass_changes(gm)
    assert found is not None
    assert bool(found) == changes
    if expected is not None:
        assert changes == expected


@pytest.mark.parametrize("name", list(MODULES))
def test_direct_export_of_mixed_dtypes_matches_torch(name, tmp_path):
    module = MODULES[name][0]()
    inputs = _inputs()
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},) * 2
    path = str(tmp_path / "m.onnx")
    proto = to_onnx(module, inputs, "ort", dynamic_shapes=dims)
    import onnx
    onnx.save(proto, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for batch, length, seed in [(2, 5, 1), (3, 9, 2)]:
        x, ids = _inputs(batch, length, seed)
        feeds = dict(zip([i.name for i in session.get_inputs()], [x.numpy(), ids.numpy()]))
        (got,) = session.run(None, feeds)
        want = module(x, ids)
        assert got.dtype == want.numpy().dtype
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)


def test_unknown_values_run_the_pass():
    gm = _program(IntPlusFloat(), _inputs()).graph_module
    for node in gm.graph.nodes:
        node.meta.pop("val", None)
    assert onnx_type_promotion.promotions(gm) is None
    ran = []
    assert onnx_type_promotion.promote_types(gm, ran.append) and ran == [gm]


def test_missing_table_runs_the_pass(monkeypatch):
    monkeypatch.setattr(onnx_type_promotion, "_RULES", ("torch.onnx._internal.no_such_module", ("X",)))
    gm = _program(SameDtypes(), _inputs()).graph_module
    assert onnx_type_promotion.promotions(gm) is None


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
@pytest.mark.parametrize("arch", list(tiny_models.ARCHITECTURES))
def test_check_agrees_on_q_op_graphs(arch, recipe, tmp_path, monkeypatch):
    """Each traced q-op graph ``export_onnx`` translates directly: the check's answer against the pass."""
    seen = []
    real = onnx_type_promotion.promote_types

    def spy(gm, insert):
        seen.append((onnx_type_promotion.promotions(gm), _pass_changes(gm)))
        return real(gm, insert)

    monkeypatch.setattr(onnx_type_promotion, "promote_types", spy)
    model, vocab = tiny_models.build(arch)
    qcompiler.export_onnx(model, tiny_models.token_batch(vocab, 2, 12, padded=True), str(tmp_path / "m.onnx"),
                          recipe=recipe, form="ort")
    assert seen or arch in NEEDS_DECOMPOSITION
    for found, changes in seen:
        assert found is not None and bool(found) == changes
