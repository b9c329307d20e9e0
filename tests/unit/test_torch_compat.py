"""Each private torch API qcompile uses (``qcompiler.torch_compat``), checked on the installed torch.

A failure here names the entry a torch release changed: fix it in ``qcompiler/torch_compat.py``.
Runs on torch 2.13 in CI and on the GPU machine's torch 2.11 (the CUDA kernels there only).
"""
import inspect

import pytest
import torch
from torch import nn

from qcompiler import errors, torch_compat

CUDA = torch.cuda.is_available()


def _compile_with(backend, model, x):
    compiled = torch.compile(model, backend=backend, options={"probe": 1})
    compiled(x)
    return compiled


def test_the_backend_call_finds_its_compile_and_the_compiled_object_leads_back_to_it():
    seen = {}

    def backend(gm, example_inputs, options=None):
        seen["wrapper"] = torch_compat.calling_compile(skip=1)
        seen["tracing"] = torch_compat.tracing_context()
        seen["scopes"] = torch_compat.traced_frame_scopes()
        seen["chains"] = [torch_compat.source_chain(n) for n in gm.graph.nodes if n.op == "placeholder"]
        return gm.forward

    torch._dynamo.reset()
    model = nn.Linear(4, 3)
    compiled = _compile_with(backend, model, torch.randn(2, 4))
    assert seen["wrapper"] is not None, "calling_compile: torch.compile's wrapper is no longer a calling frame's self"
    assert torch_compat.compile_of(compiled) is seen["wrapper"], "compile_of: the wrapper moved in Dynamo's callbacks"
    name, options = torch_compat.compile_settings(seen["wrapper"])
    assert options == {"probe": 1}, "compile_settings: the wrapper no longer keeps torch.compile's options"
    assert seen["tracing"] is not None, "tracing_context: no TracingContext inside a backend call"
    with torch_compat.tracing(seen["tracing"]):
        pass
    assert seen["scopes"] is not None, "traced_frame_scopes: InstructionTranslator.current_tx() is gone"
    values = [torch_compat.source_value(c[-1], seen["scopes"]) for c in seen["chains"] if c]
    assert any(v is model for v in values), "source_value: a graph input's source no longer leads to the module"


def test_a_copied_dynamo_graph_keeps_its_sources_and_new_buffers_get_constant_ones():
    kept = {}

    def backend(gm, example_inputs, options=None):
        import copy

        dup = copy.deepcopy(gm)
        torch_compat.copy_dynamo_sources(gm, dup)
        kept["sources"] = getattr(gm, "_param_name_to_source", None)
        kept["copy"] = dict(getattr(dup, "_param_name_to_source", None) or {}) or None
        dup.register_buffer("_qc_probe", torch.zeros(1))
        torch_compat.register_constant_sources(dup)
        kept["added"] = dup._param_name_to_source.get("_qc_probe") if kept["copy"] is not None else None
        return gm.forward

    torch._dynamo.reset()
    _compile_with(backend, nn.Linear(4, 3), torch.randn(2, 4))
    assert kept["sources"] is not None, "Dynamo graphs no longer carry _param_name_to_source"
    assert kept["copy"] == kept["sources"], "copy_dynamo_sources did not carry the sources over"
    assert kept["added"] is not None, "register_constant_sources: ConstantSource is gone"


def test_errors_pass_through_dynamo_unwrapped():
    cls = torch_compat.passing_dynamo(errors.OptionError)
    assert issubclass(cls, errors.OptionError)
    assert cls is not errors.OptionError, "torch._dynamo.exc.ShortenTraceback is gone: errors arrive wrapped"

    def backend(gm, example_inputs, options=None):
        raise torch_compat.through_dynamo(errors.OptionError("a bad option"), inspect.currentframe())

    torch._dynamo.reset()
    with pytest.raises(errors.OptionError, match="a bad option"):
        _compile_with(backend, nn.Linear(4, 3), torch.randn(2, 4))


def test_dynamo_restart_and_its_state():
    assert torch_compat.DYNAMO_RESTART != (), "TensorifyScalarRestartAnalysis is gone"
    torch_compat.forget_restart()  # must not raise


def test_fake_values_of_a_graph_and_is_fake():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    vals = torch_compat.fake_values(gm, [torch.randn(2, 4)])
    assert vals, "fake_values: FakeTensorProp could not run the graph"
    shapes = {tuple(v.shape) for v in vals.values() if isinstance(v, torch.Tensor)}
    assert (2, 3) in shapes and all(torch_compat.is_fake(v) for v in vals.values() if isinstance(v, torch.Tensor))
    assert not torch_compat.is_fake(torch.zeros(1)) and not torch_compat.is_fake(3)


def test_inductor_entry_and_cacheable_functions():
    gm = torch.fx.symbolic_trace(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    expected = gm(x)
    patch = torch_compat.cacheable_functions_patch({"math.sqrt": "key"})
    assert patch == {"unsafe_marked_cacheable_functions": {"math.sqrt": "key"}}, \
        "Inductor's unsafe_marked_cacheable_functions is gone: compiled graphs stop being cached on disk"
    fn = torch_compat.compile_fx(gm, [x], config_patches=patch)
    out = fn(x)
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, expected)


def test_an_op_schema_names_its_arguments():
    names = [a.name for a in torch_compat.op_schema(torch.ops.aten.add.Tensor).arguments]
    assert names == ["self", "other", "alpha"], "OpOverload._schema changed"


def test_the_linear_function_dynamo_records_and_check():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    torch.testing.assert_close(torch_compat.C_LINEAR(x, w), x @ w.t())
    torch_compat.check(True, lambda: "never")
    with pytest.raises(RuntimeError, match="the message"):
        torch_compat.check(False, lambda: "the message")


@pytest.mark.parametrize("op,args", [
    ("_int_mm", ["self", "mat2"]),
    ("_scaled_mm", ["self", "mat2", "scale_a", "scale_b", "bias", "scale_result", "out_dtype", "use_fast_accum"]),
    ("_convert_weight_to_int4pack", ["self", "innerKTiles"]),
    ("_weight_int4pack_mm", ["self", "mat2", "qGroupSize", "qScaleAndZeros"]),
])
def test_the_aten_kernels_keep_their_signatures(op, args):
    schema = torch_compat.op_schema(getattr(torch.ops.aten, op).default)
    assert [a.name for a in schema.arguments] == args, f"aten.{op} changed its signature: {schema}"


@pytest.mark.skipif(not CUDA, reason="the CUDA kernels need a GPU")
def test_the_cuda_kernels_compute_what_they_should():
    a = torch.randint(-8, 8, (32, 64), dtype=torch.int8, device="cuda")
    b = torch.randint(-8, 8, (64, 16), dtype=torch.int8, device="cuda")
    assert torch.equal(torch_compat.int_mm(a, b).cpu(), a.cpu().int() @ b.cpu().int())
