"""Schemes: the registry, a scheme added from outside the package, per-module recipe overrides."""
import operator

import pytest
import torch
from torch import nn

import qcompiler
from models import Block
from qcompiler.ir import ops
from qcompiler.passes.sqnr import sqnr_db
from qcompiler.recipes import Recipe, get_recipe, list_recipes
from qcompiler.schemes import registry
from qcompiler.schemes.base import Scheme, per_channel
from qcompiler.schemes.registry import SCHEMES, SchemeKey

qops = torch.ops.qcompile
TOY = SchemeKey("int8", "fp8", "dynamic")


@torch.library.custom_op("qcompile_toy::linear_f8_i8", mutates_args=())
def linear_f8_i8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The toy scheme's kernel: FP8 activation codes times INT8 weight codes, scaled after (float64)."""
    y = (xq.double() @ wq.double().t()) * x_scale.double() * w_scale.double() + bias.double()
    return y.to(out_dtype)


@linear_f8_i8.register_fake
def _(xq, x_scale, wq, w_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


class Int8WeightsFp8Tokens(Scheme):
    """A scheme the package does not have: INT8 weights per channel, FP8 E4M3 activations per token."""

    qop = "qcompile_toy::linear_f8_i8"

    def describe(self, recipe):
        return "INT8 weights per channel, FP8 activations per token (toy)"

    def quantize_weight(self, weight, recipe, prepared):
        return per_channel(weight, torch.int8)

    def reference(self, x, weight, *, bias, smooth_inv, x_scale, recipe):
        xq, sx = ops.quantize_per_token_ref(x, smooth_inv, torch.float8_e4m3fn)
        return linear_f8_i8(xq, sx, weight.wq, weight.wscale, bias, torch.float32)

    def emit(self, graph, x, weight, *, bias, smooth_inv, x_scale, recipe, out_dtype):
        q = graph.call_function(qops.quantize_per_token.default, (x, smooth_inv, torch.float8_e4m3fn))
        xq, sx = graph.call_function(operator.getitem, (q, 0)), graph.call_function(operator.getitem, (q, 1))
        return graph.call_function(torch.ops.qcompile_toy.linear_f8_i8.default,
                                   (xq, sx, weight.wq, weight.wscale, bias, out_dtype))


@pytest.fixture
def toy_scheme():
    registry.register_scheme(TOY, Int8WeightsFp8Tokens(TOY))
    yield
    SCHEMES.unregister(TOY)


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_finds_a_scheme_made_for_its_key(name):
    key = get_recipe(name).scheme_key
    if key is None:  # weights stay float ("auto" assigns recipes per layer)
        return
    scheme = SCHEMES.get(key)
    assert scheme.key == key and scheme.qop in ("linear_w8a8", "linear_w8a8_blocks", "linear_w8a16", "linear_w4a16")
    assert scheme.describe(get_recipe(name))


def test_a_recipe_without_a_scheme_names_the_registered_ones():
    with pytest.raises(qcompiler.OptionError, match=r"no scheme quantizes int8 weights, fp8 activations per token;"
                                                   r".*int8 weights, int8 activations per token"):
        get_recipe("w8a8").replace(activation_format="fp8")


def test_a_scheme_registered_from_outside_the_package_compiles_on_the_reference_target(toy_scheme):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24)).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = model(x)
        toy = torch.compile(model, backend="qcompile",
                            options={"recipe": "w8a8", "activation_format": "fp8", "target": "reference"})
        out = toy(x)
        int8 = torch.compile(nn.Sequential(model[0]), backend="qcompile",
                             options={"recipe": "w8a8", "target": "reference"})(x)
    # the toy's numerics, worked out here: FP8 codes of x per token, INT8 codes of W per channel
    w, b = model[0].weight.detach().double(), model[0].bias.detach().double()
    ws = w.abs().amax(1) / 127
    wq = (w / ws[:, None]).round().clamp(-127, 127)
    sx = x.double().abs().amax(1, keepdim=True) / 448
    xq = (x.double() / sx).to(torch.float8_e4m3fn).double()
    expected = ((xq @ wq.t()) * sx * ws + b).float()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, int8, rtol=1e-4, atol=1e-4)  # not the INT8-activation scheme
    assert 20 < sqnr_db(ref, out) < sqnr_db(ref, int8)  # FP8's 3 mantissa bits: worse than INT8 per token
    rows = qcompiler.explain(toy)
    assert [r.reason for r in rows if r.op == "linear"] == ["INT8 weights per channel, FP8 activations per token (toy)"]


def test_a_scheme_key_can_be_registered_once(toy_scheme):
    with pytest.raises(qcompiler.OptionError, match="already registered"):
        registry.register_scheme(TOY, Int8WeightsFp8Tokens(TOY))
    with pytest.raises(qcompiler.OptionError, match="already registered"):
        registry.register_scheme(SchemeKey("int8"), Int8WeightsFp8Tokens(SchemeKey("int8")))


def test_overrides_merge_fields_onto_the_recipe_per_module():
    r = get_recipe("w4a16").replace(overrides={"*down": {"group_size": 32, "symmetric": False}, "o": "w8a16",
                                               "up": "fp"})
    down = r.for_module("blocks.0.down")
    assert (down.group_size, down.symmetric, down.name, down.overrides) == (32, False, "w4a16", ())
    assert r.for_module("o").name == "w8a16" and r.for_module("up") is None and r.for_module("q") is r
    assert Recipe(**r.as_fields()) == r  # what a saved manifest holds makes the same recipe
    with pytest.raises(qcompiler.OptionError, match=r"power of two >= 16.*got 33 \(in the override of '\*down'\)"):
        get_recipe("w4a16").replace(overrides={"*down": {"group_size": 33}})
    with pytest.raises(qcompiler.OptionError, match=r"unknown recipe field\(s\) \['gruop_size'\]"):
        get_recipe("w4a16").replace(overrides={"*down": {"gruop_size": 32}})
    with pytest.raises(qcompiler.OptionError, match="cannot change"):
        get_recipe("w4a16").replace(overrides={"*down": {"name": "x"}})


def test_a_per_module_override_reaches_the_compiled_layer():
    torch.manual_seed(0)
    model = Block(d=64, h=128)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        fast = torch.compile(model, backend="qcompile",
                             options={"recipe": "w4a16", "group_size": 64, "overrides": {"down": {"group_size": 16}},
                                      "target": "reference"})
        fast(x)
    reasons = {r.module: r.reason for r in qcompiler.explain(fast) if r.op == "linear"}
    assert "group 16" in reasons["down"] and all("group 64" in v for k, v in reasons.items() if k != "down")


def test_recipes_are_made_of_specs_that_read_back_flat():
    r = get_recipe("w4a16-gptq")
    assert r.weights.group_size == r.group_size == 128 and r.rounding.algorithm == r.algorithm == "gptq"
    assert r.replace(rounding=r.rounding.__class__(algorithm="rtn")).algorithm == "rtn"
    with pytest.raises(AttributeError):
        r.no_such_field
