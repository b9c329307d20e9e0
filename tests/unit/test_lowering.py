"""Each lowering's q-op implementations against the reference q-ops, on fresh random inputs."""
import pytest
import torch

from conftest import rel_err
from qcompiler.ir import ops
from qcompiler.lowering import LOWERINGS, get_lowering
from qcompiler.lowering.inductor import (IMPLEMENTATIONS, attention_q8_float_gemm, attention_q8_static_float_gemm,
                                        linear_w8a8_blocks_float_gemm, linear_w8a8_float_gemm)

qops = torch.ops.qcompile


@pytest.mark.parametrize("m,k,n", [(1, 7, 3), (33, 576, 40), (9, 1536, 17)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_inductor_w8a8_float_gemm_matches_reference(m, k, n, out_dtype):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    xs, ws, b = torch.rand(m, 1), torch.rand(n), torch.randn(n)
    ref = ops.linear_w8a8_ref(xq, xs, wq, ws, b, torch.float32)
    out = linear_w8a8_float_gemm(xq, xs, wq, ws, b, out_dtype)
    # K <= 1024: the float32 GEMM on integers is exact, only the epilogue rounds (~1e-7);
    # K > 1024: float32 accumulation rounding too; bfloat16 output: its 8-bit mantissa (~4e-3)
    tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-6
    assert out.dtype == out_dtype and rel_err(out, ref) < tol


def test_every_inductor_implementation_is_a_qop_or_its_reference():
    # the float-GEMM implementations are each tested against their reference (above; attention:
    # tests/unit/test_attention.py, test_attention_static.py; blocks: tests/unit/test_linear_blocks.py)
    assert set(IMPLEMENTATIONS) == set(ops.REFERENCE)
    for op, impl in IMPLEMENTATIONS.items():
        assert impl is ops.REFERENCE[op] or impl in (linear_w8a8_float_gemm, linear_w8a8_blocks_float_gemm,
                                                     attention_q8_float_gemm, attention_q8_static_float_gemm)


def test_inductor_graphs_are_cached_across_processes():
    """Inductor's and AOTAutograd's on-disk caches take the quantized graph (a new process compiling
    the same model skips the trace and codegen): after a reset, the second compile hits both. A
    Llama, whose projections' outputs are reshaped by tensor methods: the q-ops that replace them
    must carry the value Dynamo recorded, or AOTAutograd's cache refuses the graph."""
    from torch._dynamo.utils import counters

    from tiny_models import build, token_batch

    model, vocab = build("llama")
    batch = token_batch(vocab, 2, 6)
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16", "group_size": 32,
                                                                 "target": "inductor"})
        with torch.no_grad():
            fast(**batch)
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1, dict(counters["aot_autograd"])
    assert not counters["aot_autograd"]["autograd_cache_bypass"]


def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown target 'tensorrtt'.*'inductor'.*'reference'.*'tensorrt'"):
        get_lowering("tensorrtt")
    assert {"reference", "inductor"} <= set(LOWERINGS)


@pytest.mark.parametrize("device,dtype,expected", [
    ("cpu", torch.float32, "ort"), ("cpu", torch.bfloat16, "inductor"), ("cuda", torch.float32, "triton"),
    ("mps", torch.float32, "reference")])
def test_auto_target_follows_the_measured_order_per_device_and_dtype(device, dtype, expected):
    from qcompiler.lowering import LOWERINGS, auto_target

    inputs = [torch.empty(2, 3, dtype=dtype), torch.zeros(2, dtype=torch.int64)]
    if expected == "triton" and not LOWERINGS["triton"].can_run(inputs)[0]:
        expected = "inductor"  # no triton package here (the interpreter would run its kernels on these CPU tensors)
    assert auto_target(device, inputs) == expected


def test_auto_target_skips_ort_when_onnxruntime_is_missing(monkeypatch):
    import importlib.util

    from qcompiler.lowering import auto_target

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find(name, *a))
    assert auto_target("cpu", [torch.empty(2, 3)]) == "inductor"
