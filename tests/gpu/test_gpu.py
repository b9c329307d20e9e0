"""The backend on a CUDA device (skipped without one): every target, bf16 and fp16 models."""
import pytest
import torch

import qcompiler
from conftest import rel_err
from models import Stack, with_outlier_channels
from qcompiler.ir import ops
from qcompiler.passes.quantize import sqnr_db

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


# least SQNR of the reference q-op graph against FP32 on this model (INT4 and FP8 are coarser)
MIN_SQNR = {"w8a8": 25, "w8a16": 25, "w8a8-smoothquant": 25, "fp8": 20, "w4a16": 15}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("recipe", sorted(MIN_SQNR))
def test_cuda_targets_match_the_cpu_reference(dtype, recipe):
    torch.manual_seed(0)
    model = Stack(n=2, d=64, h=96).eval()
    x = with_outlier_channels(torch.randn(2, 33, 64), factor=8.0)
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
    # bf16/fp16 activations: the 16-bit rounding of inputs and outputs dominates (~1e-2)
    assert rel_err(outs["inductor"], outs["reference"]) < 2e-2
    assert rel_err(outs["triton"], outs["reference"]) < 2e-2
    assert torch.equal(outs["auto"], outs["inductor"])
    assert sqnr_db(ref_fp32, outs["reference"]) > MIN_SQNR[recipe]


@pytest.mark.parametrize("m,k,n", [(1, 576, 40), (33, 1536, 24)])
def test_cuda_reference_linear_is_exact(m, k, n):
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda")
    assert torch.equal(ops.int_matmul(xq, wq).cpu(), (xq.cpu().long() @ wq.cpu().long().t()).double())
