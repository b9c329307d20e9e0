"""The backend on a CUDA device (skipped without one): every target, bf16 and fp16 models, the
decode sizes (M = 1, 8, 16) and a prefill, the 8-bit attention kernel, the quantized-KV kernel in
``generate()``, and CUDA graphs. On a real GPU: the CPU interpreter widens bf16 products to float32
and runs only the first autotune config, so these are the checks of what the kernels compute."""
import pytest
import torch

import qcompiler
from conftest import rel_err
from models import Stack, with_outlier_channels
from qcompiler.ir import ops
from qcompiler.passes.sqnr import sqnr_db

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# least SQNR of the reference q-op graph against FP32 on this model (INT4 and FP8 are coarser)
MIN_SQNR = {"w8a8": 25, "w8a16": 25, "w8a8-smoothquant": 25, "fp8": 20, "w4a16": 15}


# (batch, tokens): M = batch x tokens rows reach each linear: decode sizes (the GEMV kernels) and a prefill
SHAPES = [(1, 1), (1, 8), (2, 8), (2, 33)]


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, s) for s in SHAPES] + [(torch.float16, (2, 33))],
                         ids=lambda v: f"M{v[0] * v[1]}" if isinstance(v, tuple) else str(v).replace("torch.", ""))
@pytest.mark.parametrize("recipe", sorted(MIN_SQNR))
def test_cuda_targets_match_the_cpu_reference(dtype, shape, recipe):
    torch.manual_seed(0)
    model = Stack(n=2, d=64, h=96).eval()
    x = with_outlier_channels(torch.randn(*shape, 64), factor=8.0)
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    ref_fp32 = model(x)
    gpu_model = model.to("cuda", dtype)  # new Parameter objects? no: .to() keeps them in place
    with qcompiler.calibrate(gpu_model, [x.to("cuda", dtype)], progress=False):
        pass
    outs = {}
    for target in ("reference", "inductor", "auto", "triton"):
        torch._dynamo.reset()
        fast = torch.compile(gpu_model, backend="qcompile", options={"recipe": recipe, "target": target})
        outs[target] = fast(x.to("cuda", dtype)).float().cpu()
        if target == "auto":  # triton where its kernels measured faster than the float linears, else Inductor
            [graph] = qcompiler.explain(fast).graphs
            assert graph.running in ("triton", "inductor") and "measured" in graph.reason, graph
    # bf16/fp16 activations: the 16-bit rounding of inputs and outputs dominates (~1e-2)
    assert rel_err(outs["inductor"], outs["reference"]) < 2e-2
    assert rel_err(outs["triton"], outs["reference"]) < 2e-2
    assert rel_err(outs["auto"], outs["reference"]) < 2e-2
    assert sqnr_db(ref_fp32, outs["reference"]) > MIN_SQNR[recipe]


@pytest.mark.parametrize("m,k,n", [(1, 576, 40), (33, 1536, 24)])
def test_cuda_reference_linear_is_exact(m, k, n):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    assert torch.equal(ops.int_matmul(xq, wq).cpu(), (xq.cpu().long() @ wq.cpu().long().t()).double())


def _llama(dtype=torch.bfloat16):
    from tiny_models import build

    model, vocab = build("llama", dtype=dtype)
    return model.to("cuda"), vocab


def test_bf16_attention_kernel_matches_the_reference():
    """``attention="int8"`` on the triton target: the 8-bit attention kernel on a bf16 model, prefill
    with a padding mask, against the reference target."""
    from tiny_models import token_batch

    model, vocab = _llama()
    batch = {k: v.cuda() for k, v in token_batch(vocab, 2, 33, padded=True).items()}
    outs = {}
    for target in ("reference", "triton"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "attention": "int8", "target": target})
        with torch.no_grad():
            outs[target] = fast(**batch).logits.float()
    live = batch["attention_mask"].bool()
    assert sqnr_db(outs["reference"][live], outs["triton"][live]) > 30  # bf16 rounding in another order
    assert any(r.scheme == "attention-int8" for r in qcompiler.explain(fast))


def _generate_against_reference(options: dict, kv: str = None, new: int = 8):
    """Greedy ``generate()`` of the bf16 tiny Llama on CUDA with ``options`` and with the same
    options on the reference target (a quantized cache ``kv`` in both where given): the same
    generation (``assert_same_generation``). Returns the compiled model."""
    from tiny_models import assert_same_generation, token_batch

    _, vocab = _llama()
    prompt = {k: v.cuda() for k, v in token_batch(vocab, 1, 40, seed=3).items()}
    outs = []
    for opts in (dict(options, target="reference"), options):
        torch._dynamo.reset()
        model = _llama()[0]
        model.forward = torch.compile(model.forward, backend="qcompile", options=opts)
        cache = qcompiler.QuantizedKVCache(model.config, kv, group_size=16, residual=8) if kv else None
        with torch.no_grad():
            outs.append(model.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=0, cache=cache, output_logits=True, return_dict_in_generate=True))
    # bf16 activations, and (with a quantized cache) a code on a rounding boundary may differ
    assert_same_generation(*outs, start=prompt["input_ids"].shape[1], floor_db=30.0)
    return model


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantized_kv_kernel_in_generate(kv):
    """Decode over a quantized KV cache on the triton target reads the codes in the fused kernel."""
    model = _generate_against_reference({"recipe": "w8a16", "target": "triton"}, kv=kv, new=24)
    assert "attention fused with the read of its quantized KV cache" in str(qcompiler.explain(model))


@pytest.mark.parametrize("recipe", ["w4a16", "w8a16", "fp8"])
def test_cuda_graphs_generate_what_the_reference_generates(recipe):
    """``cuda_graphs=True`` (replayed graphs, static buffers) through a whole ``generate()``."""
    _generate_against_reference({"recipe": recipe, "target": "triton", "cuda_graphs": True})
