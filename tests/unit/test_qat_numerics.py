"""Quantization-aware training: each scheme's fake quantization against its reference q-ops (values
bit for bit, gradients by their definition), and the errors prepare / convert / distill give."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import qcompiler
import qcompiler.qat as qat
from conftest import rel_err
from qcompiler.calibration.state import state_of
from qcompiler.errors import CalibrationError, OptionError, TrainingError
from qcompiler.ir import int4, ops
from qcompiler.qat.prepare import qat_layers
from qcompiler.recipes import get_recipe
from qcompiler.schemes import fake_quant
from qcompiler.schemes.registry import SCHEMES, SchemeKey

# one recipe per built-in scheme (weight-only INT4 in both grids)
RECIPES = {
    "w8a16": SchemeKey("int8"),
    "w8a8": SchemeKey("int8", "int8", "dynamic"),
    "fp8": SchemeKey("fp8", "fp8", "dynamic"),
    "w8a8-static": SchemeKey("int8", "int8", "static"),
    "fp8-static": SchemeKey("fp8", "fp8", "static"),
    "w4a16": SchemeKey("int4"),
}


def _recipe(name: str, **fields):
    return get_recipe(name).replace(**fields) if fields else get_recipe(name)


@pytest.mark.parametrize("shape", [(16, 64), (5, 40)])
@pytest.mark.parametrize("name,fields", [(n, {}) for n in RECIPES] + [
    ("w4a16", {"group_size": 32}), ("w4a16", {"group_size": 32, "symmetric": False})])
def test_fake_weight_is_the_reference_dequantized_weight(name, fields, shape):
    """Forward, the fake-quantized weight equals the scheme's quantized weight dequantized, bit for bit
    (the same division, rounding and clamp), on fresh random weights; trained_weight gives the codes back."""
    recipe = _recipe(name, **fields)
    scheme = SCHEMES.get(recipe.scheme_key)
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    q = scheme.quantize_weight(w, recipe, None)
    scale, zero = scheme.learned_scales(q)
    fake = scheme.fake_weight(w, scale, zero, recipe)
    assert torch.equal(fake, scheme.dequantized(q, recipe, shape[1]))
    trained = scheme.trained_weight(w, scale, zero, recipe)
    if isinstance(trained, int4.PackedInt4):
        assert torch.equal(trained.packed, q.w4) and torch.equal(trained.dequantize(), fake)
    else:
        assert torch.equal(trained.wq, q.wq) and torch.equal(trained.wscale, q.wscale)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 200), group=st.sampled_from([16, 32, 64, 128]),
       symmetric=st.booleans(), spread=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_int4_fake_weight_fuzzed(n, k, group, symmetric, spread, seed):
    """Any shape (K not a multiple of the group: padded), grid and magnitude: the fake-quantized
    INT4 weight is the packed weight dequantized, bit for bit, and every value finite."""
    recipe = _recipe("w4a16", group_size=group, symmetric=symmetric)
    scheme = SCHEMES.get(recipe.scheme_key)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * spread
    q = scheme.quantize_weight(w, recipe, None)
    fake = scheme.fake_weight(w, *scheme.learned_scales(q), recipe)
    assert torch.isfinite(fake).all() and torch.equal(fake, scheme.dequantized(q, recipe, k))


@pytest.mark.parametrize("name", ["w8a8", "fp8", "w8a8-static", "fp8-static"])
def test_fake_input_and_layer_match_the_reference_q_ops(name):
    """Activations: fake per-token / per-tensor quantization equals the reference codes times their
    scale; the whole fake-quantized layer is the reference linear up to float32 summation order."""
    recipe = get_recipe(name)
    scheme = SCHEMES.get(recipe.scheme_key)
    x = torch.randn(3, 7, 48) * torch.rand(3, 7, 1) * 4
    w, b = torch.randn(24, 48) * 0.1, torch.randn(24)
    qw = scheme.quantize_weight(w, recipe, None)
    if scheme.key.scale == "static":
        x_scale = ops.scale_from_amax(x.abs().amax() * 0.7, scheme.activation_dtype)  # 0.7: values saturate
        want = ops.dequantize_ref(ops.quantize_per_tensor_ref(x, x_scale, None, scheme.activation_dtype), x_scale)
    else:
        x_scale = None
        xq, sx = ops.quantize_per_token_ref(x, None, scheme.activation_dtype)
        want = ops.dequantize_ref(xq, sx)
    assert torch.equal(scheme.fake_input(x, x_scale, recipe), want)
    fake = nn.functional.linear(scheme.fake_input(x, x_scale, recipe), scheme.fake_weight(w, *scheme.learned_scales(qw),
                                                                                         recipe), b)
    ref = scheme.reference(x, qw, bias=b, smooth_inv=None, x_scale=x_scale, recipe=recipe)
    assert rel_err(fake, ref) < 1e-6


def test_nan_never_passes_through_fake_quantization():
    """A NaN in a row makes that row's output NaN (never a finite wrong number), as the q-ops do."""
    recipe = get_recipe("w8a8")
    scheme = SCHEMES.get(recipe.scheme_key)
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    y = scheme.fake_input(x, None, recipe)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


def test_straight_through_gradient_and_clipping():
    """Inside the grid the weight's gradient passes straight through; a weight clipped at the grid's
    end gets none."""
    recipe = _recipe("w4a16", group_size=32)
    w = torch.randn(4, 64, requires_grad=True)
    scheme = SCHEMES.get(recipe.scheme_key)
    scale, _ = scheme.learned_scales(scheme.quantize_weight(w.detach(), recipe, None))
    scale = scale * 0.5  # half the range: the largest weights now saturate
    fake = scheme.fake_weight(w, scale, None, recipe)
    fake.sum().backward()
    v = (w.detach() / scale.repeat_interleave(32, dim=1))
    inside = (v >= -8) & (v <= 7)
    assert (~inside).any() and inside.any()
    assert torch.equal(w.grad, inside.to(torch.float32))


@pytest.mark.parametrize("qdtype,qmax", [(torch.int8, 127.0), (torch.float8_e4m3fn, 448.0)])
def test_lsq_scale_gradient(qdtype, qmax):
    """d(sum x_hat)/ds = sum(q - v) inside the grid plus the grid's ends outside, times 1/sqrt(N Qp)."""
    w = torch.randn(3, 50)
    s0 = w.abs().amax(dim=1) / qmax * 0.6
    s = s0.clone().requires_grad_(True)
    fake_quant.per_channel(w, s, qdtype).sum().backward()
    v = w / s0[:, None]
    low, high = (-128.0, 127.0) if qdtype == torch.int8 else (-qmax, qmax)
    c = v.clamp(low, high)
    q = torch.round(c) if qdtype == torch.int8 else c.to(qdtype).to(torch.float32)
    want = torch.where((v >= low) & (v <= high), q - v, c).sum(dim=1) / (50 * qmax) ** 0.5
    assert torch.allclose(s.grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 40])
def test_int4_weight_and_scale_gradients(symmetric, k):
    """INT4 (one autograd node): the weight's gradient passes inside the grid only; each group
    scale's is sum(g * (q - v)) inside plus the grid's end outside, times 1/sqrt(group * Qp); a
    scale below its floor gets none. Against the formula in float64."""
    gen = torch.Generator().manual_seed(k + symmetric)
    w = torch.randn(6, k, generator=gen)
    recipe = _recipe("w4a16", group_size=16, symmetric=symmetric)
    scheme = SCHEMES.get(recipe.scheme_key)
    s0, zero = scheme.learned_scales(scheme.quantize_weight(w, recipe, None))
    s0 = s0 * 0.7  # some weights saturate
    s0[0, 0] = 0.0  # at the floor: no gradient
    s = s0.clone().requires_grad_(True)
    wp = w.clone().requires_grad_(True)
    upstream = torch.randn(6, k, generator=gen)
    (fake_quant.int4_grouped(wp, s, zero, 16) * upstream).sum().backward()
    g = int4.grouped(w.double(), 16)
    up = int4.grouped(upstream.double(), 16)
    sd = s0.double().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    v = g / sd
    low, high = (-8.0, 7.0) if zero is None else (-zero.double()[..., None], 15 - zero.double()[..., None])
    c = torch.maximum(torch.minimum(v, torch.as_tensor(high, dtype=torch.float64)), torch.as_tensor(low, dtype=torch.float64))
    inside = (v >= low) & (v <= high)
    want_s = (up * torch.where(inside, torch.round(c) - v, c)).sum(-1) / (16 * (7 if zero is None else 15)) ** 0.5
    want_s[0, 0] = 0.0
    want_w = torch.where(inside, up, 0.0).reshape(6, -1)[:, :k]
    assert (~inside).any() and torch.equal(wp.grad, want_w.float())
    assert rel_err(s.grad.double(), want_s) < 1e-5 and s.grad[0, 0] == 0


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 16)).eval()


def test_prepare_freezes_the_rest_and_convert_restores_it():
    model = _model()
    model[3].weight.requires_grad_(False)
    qat.prepare(model, {"recipe": "w4a16", "group_size": 32, "skip": ["4"]})
    layers = qat_layers(model)
    assert sorted(layers) == ["0", "2"] and isinstance(model[4], nn.Linear)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.weight", "0.weight_scale", "2.weight", "2.weight_scale"]
    qat.convert(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, True, False, True, True, True]


@pytest.mark.parametrize("options,message", [
    ("auto", "'auto' chooses each layer's format"),
    ({"recipe": "w8a8", "attention": "int8"}, "quantized attention is not trained"),
    ("w8a8-smoothquant-dynamic", "SmoothQuant's scales are chosen at compile time"),
    ({"recipe": "w8a16", "overrides": {"0": "auto"}}, "'0' takes recipe 'auto'"),
])
def test_recipes_qat_cannot_train_are_named(options, message):
    with pytest.raises(OptionError, match=message):
        qat.prepare(_model(), options)


def test_prepare_errors():
    with pytest.raises(CalibrationError, match=r"no statistics: run `with qcompiler.calibrate\(model\)"):
        qat.prepare(_model(), "w8a8-static")
    with pytest.raises(CalibrationError, match=r"rounds weights with GPTQ.*qcompiler.calibrate\(model, batches.*before qcompiler.qat.prepare"):
        qat.prepare(_model(), "w4a16-gptq")
    model = qat.prepare(_model(), "w8a8")
    with pytest.raises(OptionError, match="prepared for quantization-aware training already"):
        qat.prepare(model, "w8a8")


def test_convert_errors():
    with pytest.raises(OptionError, match=r"not prepared.*qcompiler.qat.prepare\(model"):
        qat.convert(_model())
    model = qat.prepare(_model(), "w8a8")
    model[2] = nn.Linear(64, 32)  # a quantized layer replaced between prepare and convert
    with pytest.raises(OptionError, match=r"changed between qcompiler.qat.prepare and convert \(missing: 2\)"):
        qat.convert(model)


def test_compiling_another_recipe_than_the_trained_one_is_refused():
    model = _model()
    qat.convert(qat.prepare(model, "w8a8"))
    with pytest.raises(CalibrationError, match="was trained .* for recipe 'w8a8'"), torch.no_grad():
        torch.compile(model, backend="qcompile", options={"recipe": "fp8", "target": "reference"})(torch.randn(2, 32))


def test_distill_stops_on_a_nan_loss_and_names_the_step():
    model = qat.prepare(_model(), "w8a16")
    batches = [torch.randn(4, 32) for _ in range(3)]
    with torch.no_grad():
        qat_layers(model)["2"].weight_scale[0] = float("nan")
    with pytest.raises(TrainingError, match="loss is nan at step 1 of 5"):
        qat.distill(model, batches, steps=5, progress=False, log=lambda *_: None)


def test_distill_refuses_an_autocast_dtype_it_cannot_use():
    model = qat.prepare(_model(), "w8a16")
    with pytest.raises(OptionError, match=r"autocast=torch.float64: give torch.bfloat16, torch.float16 or None"):
        qat.distill(model, [torch.randn(4, 32)], steps=1, autocast=torch.float64, progress=False, log=lambda *_: None)


def test_distill_refuses_trainable_parameters_outside_the_quantized_linears():
    model = qat.prepare(_model(), "w8a16")
    model[3].weight.requires_grad_(True)
    with pytest.raises(OptionError, match=r"outside the quantized linears are trainable \(3.weight\)"):
        qat.distill(model, [torch.randn(4, 32)], steps=1, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("train_weights,bar,autocast", [(True, 0.75, None), (False, 0.9, None),
                                                       (True, 0.75, torch.bfloat16)])
def test_distill_lowers_the_loss_against_the_float_teacher(train_weights, bar, autocast):
    """A coarse INT4 grid (group 32 of 32 inputs) on a small MLP: training the scales (and weights)
    against the float teacher lowers the output error on the training batches (also with the
    matmuls in bfloat16: the error is measured in float32)."""
    model = _model(1)
    batches = [torch.randn(16, 32) for _ in range(4)]
    qat.prepare(model, {"recipe": "w4a16", "group_size": 32}, train_weights=train_weights)
    with torch.no_grad(), qat.teaching(model):
        ref = [model(b) for b in batches]

    def err():
        with torch.no_grad():
            return sum(rel_err(model(b), r) for b, r in zip(batches, ref))

    before = err()
    record = qat.distill(model, batches, steps=60, lr=1e-3, autocast=autocast, progress=False, log=lambda *_: None)
    assert len(record["losses"]) == 60
    assert err() < bar * before
    frozen = model[3].weight.detach().clone()
    qat.convert(model)
    assert torch.equal(model[3].weight, frozen)  # the teacher's parameters never moved
    with torch.no_grad():
        want = model(batches[0])
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16", "group_size": 32,
                                                                 "target": "reference"})
        assert torch.equal(fast(batches[0]), want)  # weight-only INT4: the compiled model is the trained one
    explained = str(qcompiler.explain(fast))
    assert "trained (qcompiler.qat, 60 steps)" in explained


def test_trained_state_saves_and_loads(tmp_path):
    """The trained codes, scales and static activation scale survive qcompiler.save / load."""
    model = _model()
    with qcompiler.calibrate(model):
        model(torch.randn(8, 32))
    qat.prepare(model, "w8a8-static")
    with torch.no_grad():
        for q in qat_layers(model).values():
            q.weight_scale.mul_(1.05)
            q.input_scale.mul_(0.8)
    qat.convert(model)
    qcompiler.save(model, tmp_path / "state")
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-static", "target": "reference"})(x)
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    qcompiler.load(fresh, tmp_path / "state")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(fresh, backend="qcompile", options={"recipe": "w8a8-static", "target": "reference"})(x)
    assert torch.equal(got, want)
    prepared = state_of(fresh).prepared["0"]
    assert prepared.trained and prepared.x_scale is not None
