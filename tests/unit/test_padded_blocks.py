"""Feature sizes that are not a multiple of a recipe's block: the compiled targets compute what the reference does.

A short last block (INT4 groups, activation blocks) is padded, quantized and cut back. Inductor's
CPU code for a view cut mid-block once wrote only the first block's columns (the rest left
uninitialised: NaN, inf or garbage in bf16 and fp16 models), so every blocked recipe is compiled
here at sizes that end mid-block, in each float dtype, against the reference target.
"""
import pytest
import torch

from conftest import rel_err

import qcompiler  # noqa: F401  (registers the backend)
from qcompiler.ir import int4, numerics


@pytest.mark.parametrize("k,block", [(160, 128), (96, 64), (576, 128), (100, 32), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_joining_blocks_compiles_to_the_eager_result(k, block, dtype):
    torch.manual_seed(0)
    blocks = -(-k // block)
    codes = torch.randint(0, 16, (8, blocks, block), dtype=torch.uint8)
    scale = torch.rand(8, blocks) + 0.1

    def dequantize(codes, scale):
        return numerics.join_blocks((codes.to(torch.float32) - 8.0) * scale[..., None], k).to(dtype)
    expected = dequantize(codes, scale)
    assert expected.shape == (8, k)
    assert torch.equal(expected, numerics.split_blocks(expected, block).flatten(-2)[..., :k])
    torch._dynamo.reset()
    assert torch.equal(torch.compile(dequantize)(codes, scale), expected)


@pytest.mark.parametrize("recipe,options", [("w4a16", {}), ("w4a16", {"group_size": 32, "symmetric": False}),
                                            ("w8a8-blocks", {})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_inductor_matches_the_reference_where_a_block_is_cut(recipe, options, dtype):
    torch.manual_seed(0)
    # 160 and 100 input features: groups of 128 / 32 and activation blocks of 32 end mid-block
    model = torch.nn.Sequential(torch.nn.Linear(100, 160), torch.nn.SiLU(), torch.nn.Linear(160, 48)).to(dtype).eval()
    x = torch.randn(2, 5, 100).to(dtype)
    outs = {}
    for target in ("reference", "inductor"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": target, **options})
        with torch.no_grad():
            outs[target] = fast(x)
    assert torch.isfinite(outs["inductor"]).all()
    # the same codes and scales; a 16-bit model's activations and outputs round (a few 1e-3)
    assert rel_err(outs["inductor"], outs["reference"]) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_int4_dequantize_drops_the_padding_of_a_short_last_group():
    torch.manual_seed(0)
    w = torch.randn(6, 100)
    p = int4.quantize(w, 32, symmetric=False)
    full = int4.dequantize_codes(int4.unpack(p.packed), p.scale, p.zero, 32, 128)
    assert torch.equal(int4.dequantize(p.packed, p.scale, p.zero, 32, 100), full[:, :100])
