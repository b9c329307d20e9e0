"""The ONNX Runtime rewrites qcompile's sessions turn off (``runtimes.ort_slow_fusions``).

Each row of ``SLOW_FUSIONS`` names a real optimizer: with it on, ONNX Runtime rewrites the row's
example model; turned off by the rule, it does not. A session of a model the rule applies to
runs without it and still computes the model (against float64); a model it does not apply to
keeps every rewrite.
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import rel_err
from qcompiler.runtimes.ort_session import OrtSession, inference_session, session_options
from qcompiler.runtimes.ort_slow_fusions import SLOW_FUSIONS, disabled_optimizers, op_types

C = 64


def _residual_norm(norm: str):
    """``norm(x + r)`` on ``[B, S, C]`` (the sum not an output: a post-norm encoder's residual)."""
    vi = helper.make_tensor_value_info
    node = (helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], epsilon=1e-5, axis=-1) if norm == "layer"
            else helper.make_node("RMSNormalization", ["s", "g"], ["y"], epsilon=1e-5, axis=-1))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "g")]
    if norm == "layer":
        inits.append(numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b"))
    graph = helper.make_graph([helper.make_node("Add", ["x", "r"], ["s"]), node], "g",
                              [vi("x", TensorProto.FLOAT, ["B", "S", C]), vi("r", TensorProto.FLOAT, ["B", "S", C])],
                              [vi("y", TensorProto.FLOAT, ["B", "S", C])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


# for each row of SLOW_FUSIONS: a model the optimizer rewrites, and the op it fuses into
EXAMPLES = {"SkipLayerNormFusion": (lambda: _residual_norm("layer"), "SkipLayerNormalization")}


def _optimized_ops(model, disabled, tmp_path) -> set:
    so = session_options(1)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    inference_session(model.SerializeToString(), so, disabled=disabled)
    return {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}


@pytest.mark.parametrize("fusion", SLOW_FUSIONS, ids=lambda f: f.optimizer)
def test_each_slow_fusion_is_an_optimizer_onnx_runtime_runs_and_the_rule_turns_off(fusion, tmp_path):
    make, fused_op = EXAMPLES[fusion.optimizer]  # a new row needs an example model here
    model = make()
    assert fused_op in _optimized_ops(model, [], tmp_path), "the example must be rewritten with the optimizer on"
    rule = disabled_optimizers(op_types(model.graph))
    assert fusion.optimizer in rule
    assert fused_op not in _optimized_ops(model, rule, tmp_path)
    assert fused_op not in _optimized_ops(model, None, tmp_path)  # every session qcompile makes takes the rule


@pytest.mark.parametrize("norm,disabled", [("layer", ["SkipLayerNormFusion"]), ("rms", [])])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17)])
def test_a_session_runs_without_the_slow_fusions_of_its_model_and_computes_it(norm, disabled, shape):
    model = _residual_norm(norm)
    session = OrtSession(model.SerializeToString(), threads=1)
    assert session.disabled_optimizers == disabled
    x, r = torch.randn(*shape, C), torch.randn(*shape, C) * 10
    g = torch.from_numpy(numpy_helper.to_array(model.graph.initializer[0]).copy()).double()
    s = (x + r).double()
    if norm == "layer":
        b = torch.from_numpy(numpy_helper.to_array(model.graph.initializer[1]).copy()).double()
        ref = torch.nn.functional.layer_norm(s, (C,), g, b, 1e-5)
    else:
        ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    (y,) = session(x, r)
    assert rel_err(y, ref) < 1e-5
    x[0, 0, 3] = float("nan")
    (y,) = session(x, r)
    assert torch.isnan(y[0, 0]).all() and not torch.isnan(y[1:]).any() and not torch.isnan(y[0, 1:]).any()


def test_an_explicit_list_replaces_the_rule():
    session = OrtSession(_residual_norm("layer").SerializeToString(), threads=1, disabled=[])
    assert session.disabled_optimizers == []


def test_op_types_reach_into_subgraphs():
    vi = helper.make_tensor_value_info
    branch = lambda op: helper.make_graph([helper.make_node(op, ["x"], ["y"])], op, [], [vi("y", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch("Relu"), else_branch=branch("LayerNormalization"))
    graph = helper.make_graph([node], "g", [vi("c", TensorProto.BOOL, []), vi("x", TensorProto.FLOAT, [2])],
                              [vi("y", TensorProto.FLOAT, [2])])
    assert op_types(graph) == {"If", "Relu", "LayerNormalization"}
    assert disabled_optimizers(op_types(graph)) == ["SkipLayerNormFusion"]
