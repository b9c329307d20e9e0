"""Linears reading the same activation share its quantization on the triton target (lowering/shared_qops.py)."""
from collections import Counter

import pytest
import torch

import qcompiler
import qcompiler.calibration.state  # noqa: F401  (the passes read calibration state)
import tiny_models
from models import capture
from qcompiler.lowering.shared_qops import SHAREABLE, share
from qcompiler.passes import pipeline
from qcompiler.recipes import get_recipe


def _quantize_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SHAREABLE]


def _linear_inputs(gm):
    """Per quantize call: the activation it reads (the node its linears share)."""
    return Counter(n.args[0] for n in _quantize_calls(gm))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "phi3", "gpt2", "bert"])
@pytest.mark.parametrize("recipe", ["w8a8", "fp8", "w8a8-smoothquant-dynamic", "w8a8-static"])
def test_one_quantize_per_activation_and_the_same_outputs(arch, recipe):
    model, vocab = tiny_models.build(arch)
    batch = tiny_models.token_batch(vocab, 2, 8)
    if recipe in ("w8a8-smoothquant-dynamic", "w8a8-static"):  # their scales come from calibration
        with qcompiler.calibrate(model):
            model(**tiny_models.token_batch(vocab, 2, 8, seed=3))
    gm, ex = capture(model, batch["input_ids"])
    rec = get_recipe(recipe).replace(min_sqnr_db=None, max_static_loss_db=None)
    pipeline.run_passes(gm, ex, rec)
    before = _quantize_calls(gm)
    expected = [n.args[0] for n in before]
    with torch.no_grad():
        want = gm(*ex)
    merged = share(gm)
    after = _quantize_calls(gm)
    assert len(after) == len(before) - merged
    # every activation quantized once (SmoothQuant's group scale is one value for the group);
    # static scales (0-d constants) merge where the calibrated values are equal
    if recipe != "w8a8-static":
        assert len(after) == len(set(expected))
        assert set(_linear_inputs(gm).values()) == {1}, "an activation quantized twice"
        if arch in ("llama", "qwen2", "gemma3", "bert"):  # separate q/k/v projections
            assert merged > 0
    with torch.no_grad():
        got = gm(*ex)
    want, got = (t[0] if isinstance(t, (tuple, list)) else t for t in (want, got))
    want = getattr(want, "logits", getattr(want, "last_hidden_state", want))
    got = getattr(got, "logits", getattr(got, "last_hidden_state", got))
    assert torch.equal(want, got)


def test_calls_with_different_smoothing_stay_apart():
    x = torch.randn(4, 16)
    g = torch.fx.Graph()
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    gm.register_buffer("s0", torch.ones(16))
    gm.register_buffer("s1", torch.ones(16))        # equal to s0: shared
    gm.register_buffer("s2", torch.full((16,), 2.0))  # another value: its own call
    inp = g.placeholder("x")
    outs = []
    for name in ("s0", "s1", "s2"):
        q = g.call_function(torch.ops.qcompile.quantize_per_token.default, (inp, g.get_attr(name), torch.int8))
        outs.append(g.call_function(__import__("operator").getitem, (q, 0)))
    g.output(tuple(outs))
    gm.recompile()
    want = gm(x)
    assert share(gm) == 1
    assert len(_quantize_calls(gm)) == 2
    assert all(torch.equal(a, b) for a, b in zip(want, gm(x)))
