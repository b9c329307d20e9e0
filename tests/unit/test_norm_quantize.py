"""The RMS norm fused into the activation quantize that reads it: the kernel against its plain-torch
reference (runtimes/triton_norm_quantize.py), and the triton lowering's rewrite on tiny decoders
of several architectures (lowering/norm_quantize.py)."""
import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

import qcompiler  # noqa: E402
import qcompiler.calibration.state  # noqa: E402,F401  (the passes read calibration state)
import tiny_models  # noqa: E402
from conftest import rel_err  # noqa: E402
from models import capture  # noqa: E402
from qcompiler.ir import ops  # noqa: E402
from qcompiler.lowering import norm_quantize  # noqa: E402
from qcompiler.lowering.shared_qops import share  # noqa: E402
from qcompiler.passes import pipeline  # noqa: E402
from qcompiler.recipes import get_recipe  # noqa: E402
from qcompiler.runtimes import triton_norm_quantize as tnq  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _codes(t):
    return (t.view(torch.uint8) if t.dtype == ops.FP8 else t).to(torch.int16)


@pytest.mark.parametrize("qdtype", [torch.int8, ops.FP8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 24), (2, 5, 576)])
@pytest.mark.parametrize("smooth", [False, True])
def test_kernel_gives_the_references_codes(qdtype, dtype, shape, smooth):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(*shape, generator=g) * 3).to(dtype).to(DEVICE)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype).to(DEVICE)
    s_inv = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE) if smooth else None
    q, sc = tnq.rmsnorm_quantize(h, w, 1e-6, s_inv, qdtype, dtype)
    rq, rs = tnq.rmsnorm_quantize_ref(h, w, 1e-6, s_inv, qdtype, dtype)
    assert q.shape == h.shape and q.dtype == qdtype and sc.shape == (*shape[:-1], 1)
    # the same codes but where the norm's last-bit rounding (rsqrt, sum order) moves a quotient
    # across a rounding boundary
    assert torch.allclose(sc, rs, rtol=1e-5, atol=0)
    diff = (_codes(q) - _codes(rq)).abs()
    assert diff.float().mean() < 2e-3 and (qdtype == ops.FP8 or diff.max() <= 1)


def test_a_nan_row_gets_a_nan_scale():
    h = torch.randn(3, 32, device=DEVICE)
    h[1, 4] = float("nan")
    _, sc = tnq.rmsnorm_quantize(h, torch.ones(32, device=DEVICE), 1e-6, None, torch.int8, torch.float32)
    assert sc[1].isnan().all() and torch.isfinite(sc[[0, 2]]).all()


def test_wrong_operands_are_named():
    with pytest.raises(ValueError, match="expected torch.float32"):
        tnq.rmsnorm_quantize(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6, None, torch.int8,
                             torch.float32)


@pytest.mark.parametrize("arch,fused", [("llama", 4), ("qwen2", 4), ("mistral", 4), ("phi3", 4), ("gemma3", 0)])
@pytest.mark.parametrize("recipe", ["fp8", "w8a8-smoothquant-dynamic"])
def test_norms_fused_into_their_quantize_on_decoders(arch, fused, recipe):
    model, vocab = tiny_models.build(arch)
    if recipe.startswith("w8a8-smoothquant"):
        with qcompiler.calibrate(model):
            model(**tiny_models.token_batch(vocab, 2, 8, seed=3))
    gm, ex = capture(model, tiny_models.token_batch(vocab, 2, 8)["input_ids"])
    pipeline.run_passes(gm, ex, get_recipe(recipe).replace(min_sqnr_db=None, max_static_loss_db=None))
    share(gm)
    with torch.no_grad():
        want = gm(*ex)[0]
    # two norms a layer (attention, MLP) in two layers; Gemma's `1 + weight` norm is not this form
    assert norm_quantize.fuse(gm) == fused
    assert sum(n.target == norm_quantize.FUSED for n in gm.graph.nodes) == fused
    with torch.no_grad():
        got = gm(*ex)[0]
    assert rel_err(got, want) < 1e-3
