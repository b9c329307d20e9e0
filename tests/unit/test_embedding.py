"""Guards INT8 embedding tables (recipe field ``embedding="int8"``): the ``embedding_int8`` q-op
against its float64 reference, the embedding pass (a tied output projection reads the same INT8
table), every target, and exports that store a tied weight once."""
import zlib

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnxscript import ir
from torch import nn

import qcompiler
from conftest import rel_err
from models import capture
from qcompiler.deploy import onnx_check
from qcompiler.ir import ops
from qcompiler.passes import pipeline
from qcompiler.passes.graph_utils import qop_arguments
from qcompiler.passes.match import TIED
from qcompiler.passes.meta import FLOATING_POINT
from qcompiler.passes.sqnr import sqnr_db
from qcompiler.recipes import get_recipe
from qcompiler.runtimes.ort_session import OrtSession

qops = torch.ops.qcompile
VOCAB, DIM = 320, 48  # a table above share_tied's size threshold


class TiedLM(nn.Module):
    """Embedding, a norm and a linear, and an output projection tied to the embedding."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.head(self.norm(h + torch.relu(self.mid(h))))


def _model(tied=True, dtype=torch.float32):
    torch.manual_seed(0)
    return TiedLM(tied).to(dtype).eval()


def _passes(model, ids, recipe):
    """The backend's passes on the captured graph: (graph, inputs, linear and embedding decisions)."""
    gm, ex = capture(model, ids)
    return gm, ex, [d for d in pipeline.run_passes(gm, ex, recipe).decisions if d.op in ("linear", "embedding")]


def _targets(gm, name):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "_opname", None) == name]


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7,), (2, 5), (3, 1, 4)])
def test_embedding_int8_matches_its_float64_reference(out_dtype, shape):
    g = torch.Generator().manual_seed(zlib.crc32(repr((str(out_dtype), shape)).encode()))  # not hash(): salted per process
    table = torch.randn(VOCAB, DIM, generator=g) * torch.rand(VOCAB, 1, generator=g) * 4
    wq, scale = ops.quantize_per_channel_ref(table)
    ids = torch.randint(0, VOCAB, shape, generator=g)
    out = qops.embedding_int8(ids, wq, scale, out_dtype)
    assert out.shape == (*shape, DIM) and out.dtype == out_dtype
    exact = wq.double()[ids] * scale.double()[ids, None]
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    assert rel_err(out.double(), exact) < tol
    # per row: every row's error is within half a step of its own scale
    assert ((table[ids] - exact.float()).abs() <= scale[ids, None] / 2 + 1e-6).all()


def test_embedding_int8_never_hides_nan():
    table = torch.randn(VOCAB, DIM)
    table[3, 5] = float("nan")
    wq, scale = ops.quantize_per_channel_ref(table)
    assert torch.isnan(qops.embedding_int8(torch.tensor([3]), wq, scale, torch.float32)).any()


def test_tied_projection_reads_the_embedding_table():
    model, ids = _model(), torch.randint(0, VOCAB, (2, 9))
    ref = model(ids)
    gm, ex, decisions = _passes(model, ids, get_recipe("w8a8").replace(embedding="int8"))
    (emb,), (head,) = _targets(gm, "embedding_int8"), _targets(gm, "linear_w8a16")
    emb, head = qop_arguments(emb), qop_arguments(head)
    assert emb["wq"].target == head["wq"].target and emb["w_scale"].target == head["w_scale"].target
    d = {(r.module, r.op): r for r in decisions}
    assert d[("embed", "embedding")].scheme == "w8a8" and d[("embed", "embedding")].sqnr_db > 35
    assert d[("head", "linear")].scheme == "w8a16" and "tied" in d[("head", "linear")].reason
    assert d[("mid", "linear")].scheme == "w8a8"
    assert sqnr_db(ref, gm(*ex)[0]) > 25


def test_without_the_option_embeddings_and_tied_projection_stay_float():
    model, ids = _model(), torch.randint(0, VOCAB, (2, 9))
    gm, ex, decisions = _passes(model, ids, get_recipe("w8a8"))
    assert not _targets(gm, "embedding_int8") and not _targets(gm, "linear_w8a16")
    head = next(r for r in decisions if r.module == "head")
    assert head.scheme == FLOATING_POINT and head.reason == TIED


def test_untied_embedding_is_quantized_and_the_head_follows_the_recipe():
    model, ids = _model(tied=False), torch.randint(0, VOCAB, (2, 9))
    gm, ex, decisions = _passes(model, ids, get_recipe("w8a8").replace(embedding="int8"))
    assert len(_targets(gm, "embedding_int8")) == 1 and not _targets(gm, "linear_w8a16")
    assert {r.module: r.scheme for r in decisions if r.op == "linear"} == {"mid": "w8a8", "head": "w8a8"}


def test_skipped_or_renormalised_embeddings_stay_float_with_a_reason():
    model, ids = _model(), torch.randint(0, VOCAB, (2, 9))
    gm, _, decisions = _passes(model, ids, get_recipe("w8a8").replace(embedding="int8", skip=("embed",)))
    emb = next(r for r in decisions if r.op == "embedding")
    assert emb.scheme == FLOATING_POINT and "skip" in emb.reason and not _targets(gm, "embedding_int8")

    class MaxNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(VOCAB, DIM))

        def forward(self, ids):
            return F.embedding(ids, self.table, max_norm=1.0).sum(-1)

    gm, _, decisions = _passes(MaxNorm(), ids, get_recipe("w8a8").replace(embedding="int8"))
    assert "max_norm" in decisions[0].reason and not _targets(gm, "embedding_int8")


def test_unknown_embedding_format_is_an_option_error():
    with pytest.raises(qcompiler.OptionError, match="embedding='int4'.*valid"):
        get_recipe("w8a8").replace(embedding="int4")


@pytest.mark.parametrize("target", ["inductor", "ort", "reference"])
def test_compiled_targets_run_the_int8_table(target):
    model, ids = _model(), torch.randint(0, VOCAB, (2, 9))
    ref = model(ids)
    fast = torch.compile(model, backend="qcompile", dynamic=True,
                         options={"recipe": "w8a8", "embedding": "int8", "target": target})
    eager = _passes(model, ids, get_recipe("w8a8").replace(embedding="int8"))
    assert rel_err(fast(ids), eager[0](*eager[1])[0]) < 1e-4
    assert sqnr_db(ref, fast(ids)) > 25
    other = torch.randint(0, VOCAB, (3, 4))  # a new shape
    assert sqnr_db(model(other), fast(other)) > 25
    report = qcompiler.explain(fast)
    assert report.by_module("embed").op == "embedding" and report.by_module("head").scheme == "w8a16"


def _tables(path):
    proto = onnx.load(path)
    return [t for t in proto.graph.initializer if VOCAB in t.dims and DIM in t.dims], proto


@pytest.mark.parametrize("form,recipe", [("tensorrt", "w8a8-smoothquant"), ("tensorrt", "w8a16"), ("ort", "w8a8")])
@pytest.mark.parametrize("embedding", [None, "int8"])
def test_export_stores_the_tied_table_once(tmp_path, form, recipe, embedding):
    model, ids = _model(), torch.randint(0, VOCAB, (2, 9))
    batches = [torch.randint(0, VOCAB, (4, 16)) for _ in range(2)]
    result = qcompiler.export_onnx(model, ids, str(tmp_path / "m.onnx"), recipe=recipe, form=form,
                                   calibration=batches, options={"embedding": embedding})
    tables, proto = _tables(result.path)
    assert len(tables) == 1, [(t.name, list(t.dims)) for t in tables]
    assert tables[0].data_type == (onnx.TensorProto.INT8 if embedding else onnx.TensorProto.FLOAT)
    if form == "tensorrt":
        assert not result.violations, result.violations
    out = OrtSession(result.path)(ids)[0]
    assert sqnr_db(model(ids), out) > 20
    emb = [d for d in result.decisions if d.op == "embedding"]
    assert (emb[0].scheme != FLOATING_POINT) if embedding else not emb
    if embedding:
        assert "1 embedding table(s) INT8" in result.summary()


def test_export_of_the_tied_table_is_smaller_with_the_option(tmp_path):
    model = _model()
    ids = torch.randint(0, VOCAB, (4, 32))[:2, :9]  # a slice: strides its sizes do not give
    sizes = {e: qcompiler.export_onnx(model, ids, str(tmp_path / f"{e}.onnx"), recipe="w8a16",
                                      options={"embedding": e}).file_bytes for e in (None, "int8")}
    table = VOCAB * DIM
    assert sizes[None] - sizes["int8"] > 0.7 * 3 * table  # the FP32 table became INT8, stored once


def test_share_tied_keeps_one_copy_and_the_graph_runs():
    from qcompiler.lowering.onnx import share_tied

    w = np.random.default_rng(0).standard_normal((96, 64)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 64])
    nodes = [onnx.helper.make_node("MatMul", ["x", "wt"], ["a"]),      # x @ W.T     [n, 96]
             onnx.helper.make_node("MatMul", ["a", "w"], ["b"]),       # @ W         [n, 64]
             onnx.helper.make_node("MatMul", ["b", "wt2"], ["c"]),     # @ W.T again [n, 96]
             onnx.helper.make_node("MatMul", ["c", "w2"], ["y"])]      # @ W again   [n, 64]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "wt"),
             numpy_helper.from_array(w.T.copy(), "wt2"), numpy_helper.from_array(w.copy(), "w2")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], inits),
                                   opset_imports=[onnx.helper.make_opsetid("", 21)])
    xs = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32))
    before = OrtSession(model.SerializeToString())(xs)[0]
    shared = ir.serde.serialize_model(share_tied(ir.serde.deserialize_model(model)))
    onnx.checker.check_model(shared, full_check=True)
    assert len(shared.graph.initializer) == 1
    assert torch.equal(OrtSession(shared.SerializeToString())(xs)[0], before)
    assert not onnx_check.check(shared)


def test_share_tied_leaves_a_weight_that_is_a_graph_output():
    from qcompiler.lowering.onnx import share_tied

    w = np.random.default_rng(2).standard_normal((96, 64)).astype(np.float32)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 96])
    outputs = [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 64]),
               onnx.helper.make_tensor_value_info("w2", onnx.TensorProto.FLOAT, [96, 64])]
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], outputs,
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.copy(), "w2")]),
        opset_imports=[onnx.helper.make_opsetid("", 21)])
    shared = ir.serde.serialize_model(share_tied(ir.serde.deserialize_model(model)))
    onnx.checker.check_model(shared, full_check=True)
    assert sorted(t.name for t in shared.graph.initializer) == ["w", "w2"]
    xs = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 96)).astype(np.float32))
    y, w2 = OrtSession(shared.SerializeToString())(xs)
    assert torch.equal(w2, torch.from_numpy(w)) and torch.allclose(y, xs @ torch.from_numpy(w), atol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.int8, np.uint8])
@pytest.mark.parametrize("shape", [(7, 5), (300, 17), (1, 4096)])
def test_a_fingerprint_reads_a_transpose_as_its_contiguous_copy(monkeypatch, dtype, shape):
    from qcompiler.lowering import onnx as qonnx

    monkeypatch.setattr(qonnx, "_HASH_CHUNK_BYTES", 64)  # many chunks
    a = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    assert qonnx._fingerprint(a.T) == qonnx._fingerprint(np.ascontiguousarray(a.T))
    assert qonnx._fingerprint(a) != qonnx._fingerprint(np.ascontiguousarray(a.T))
    b = a.copy()
    b.reshape(-1)[-1] += 1  # the last value only
    assert qonnx._fingerprint(b.T) != qonnx._fingerprint(a.T)
