"""The backend end to end: entry point, targets, shapes, graph breaks, calibration, errors."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import qcompiler
import qcompiler.calibration.state
from conftest import rel_err
from models import Block, Stack, with_outlier_channels
from qcompiler.runtimes.ort_int8_probe import signed_weights_exact
from qcompiler.passes.sqnr import sqnr_db

TARGETS = ["reference", "inductor", "ort", "triton"]  # triton: the CPU interpreter without a GPU


def compile_q(model, **options):
    return torch.compile(model, backend="qcompile", options=options)


def test_entry_point_in_a_fresh_process_without_importing_qcompiler():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
        x = torch.randn(4, 64)
        with torch.no_grad():
            ref, out = m(x), torch.compile(m, backend="qcompile")(x)
        err = ((out - ref).norm() / ref.norm()).item()
        assert "qcompiler" in sys.modules  # loaded through the torch_dynamo_backends entry point
        assert 0 < err < 0.02, err          # quantized (not bit-identical), and close
        print("ok", err)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("recipe", ["w8a8", "w8a16"])
def test_targets_agree_with_the_reference_and_stay_close_to_fp32(target, recipe):
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 9, 48)
    ref_q = compile_q(model, recipe=recipe, target="reference")(x)
    torch._dynamo.reset()
    out = compile_q(model, recipe=recipe, target=target)(x)
    # inductor runs the integer GEMM as a float32 GEMM: identical up to float32 rounding. ort runs a
    # weight-only GEMM of many rows as two int8 passes per token (lowering.onnx_weight_only_int8, on a
    # CPU where u8 x s8 is exact): each activation within s / 508 of its value, about 3e-5 of the
    # output here; tests/unit/test_onnx_host_kernels.py holds it to 1e-6 of that kernel's reference
    two_passes = target == "ort" and recipe == "w8a16" and signed_weights_exact()[0]
    assert rel_err(out, ref_q) < (1e-4 if two_passes else 1e-5)
    assert sqnr_db(model(x), out) > 30


# every registered recipe: the least SQNR against FP32 it must keep on the small Stack model
MIN_SQNR = {"w8a8": 30, "w8a8-blocks": 30, "w8a8-static": 25, "w8a8-smoothquant": 25, "w8a8-smoothquant-dynamic": 30, "w8a16": 35,
            "fp8": 25, "fp8-static": 22, "w4a16": 17, "w4a16-awq": 20, "w4a16-gptq": 20, "w4a16-awq-gptq": 20, "auto": 25}


def test_every_registered_recipe_is_covered_here():
    assert set(MIN_SQNR) == set(qcompiler.list_recipes())


@pytest.mark.parametrize("target", ["inductor", "triton"])
@pytest.mark.parametrize("recipe", sorted(MIN_SQNR))
def test_every_recipe_matches_reference_and_fp32(recipe, target):
    torch.manual_seed(0)
    model = Stack(d=64, h=96)
    batches = [with_outlier_channels(torch.randn(2, 16, 64)) for _ in range(4)]
    x = with_outlier_channels(torch.randn(2, 9, 64))
    opts = {"recipe": recipe, **({"group_size": 32} if recipe.startswith("w4a16") else {}),
            **({"budget": 0.002} if recipe == "auto" else {})}
    # auto's budget is on exp(loss): with the relative output MSE as the loss, 0.002 ~ 27 dB
    loss_fn = (lambda out, batch: (out - model(batch)).pow(2).mean() / model(batch).pow(2).mean())
    qcompiler.calibrate(model, batches, recipe=opts, progress=False, loss_fn=loss_fn)
    ref_q = compile_q(model, **opts, target="reference")(x)
    torch._dynamo.reset()
    out = compile_q(model, **opts, target=target)(x)
    # the same integer / FP8 / INT4 math: only float32 rounding of the GEMMs differs
    assert rel_err(out, ref_q) < 1e-5
    assert sqnr_db(model(x), out) > MIN_SQNR[recipe]
    assert any(r.scheme not in ("floating point", "not compiled") for r in qcompiler.explain(model))


@pytest.mark.parametrize("target", TARGETS)
def test_dynamic_shapes_and_new_batch_and_sequence_lengths(target):
    torch.manual_seed(0)
    model = Stack()
    fast = torch.compile(model, backend="qcompile", options={"target": target}, dynamic=True)
    for b, t in [(1, 1), (3, 17), (2, 64), (5, 3)]:
        x = torch.randn(b, t, 48)
        out = fast(x)
        assert out.shape == (b, t, 24)
        assert sqnr_db(model(x), out) > 30, (b, t)


def test_recompiles_for_new_shapes_without_dynamic():
    torch.manual_seed(0)
    model = Stack()
    fast = compile_q(model, target="reference")
    for t in (4, 11, 32):
        x = torch.randn(2, t, 48)
        assert sqnr_db(model(x), fast(x)) > 30


class Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        print("", end="")  # a second reason to break
        x = torch.relu(self.b(x))
        return self.c(x)


@pytest.mark.parametrize("target", TARGETS)
def test_graph_breaks(target):
    torch.manual_seed(0)
    model, x = Broken().eval(), torch.randn(4, 32)
    fast = compile_q(model, target=target)
    out = fast(x)
    assert sqnr_db(model(x), out) > 30
    report = qcompiler.explain(fast)
    assert {r.module: r.scheme for r in report} == {"a": "w8a8", "b": "w8a8", "c": "w8a8"}


class BrokenLayer(nn.Module):
    """A layer with a graph break inside: Dynamo compiles its forward once and calls that graph
    for every instance, with each instance's parameters as inputs."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        return x + self.b(x)


@pytest.mark.parametrize("target", TARGETS)
def test_one_graph_serving_several_layers_uses_each_layers_own_weights(target):
    torch.manual_seed(0)
    model, x = nn.Sequential(*(BrokenLayer(32) for _ in range(3))).eval(), torch.randn(4, 32)
    fast = compile_q(model, target=target)
    out = fast(x)
    assert sqnr_db(model(x), out) > 30  # with the first layer's weights for all three: about 0 dB
    assert rel_err(out, _w8a8_eager(model, x)) < 1e-4
    report = qcompiler.explain(fast)
    assert len({r.param_id for r in report if r.op == "linear" and r.scheme == "w8a8"}) == 6, str(report)


def _w8a8_eager(model, x):
    """``BrokenLayer``s through the reference q-ops, layer by layer, without Dynamo."""
    from qcompiler.ir import ops

    def linear(lin, h):
        wq, ws = ops.quantize_per_channel_ref(lin.weight.detach())
        return ops.linear_w8a8_ref(*ops.quantize_per_token_ref(h), wq, ws, lin.bias.detach(), torch.float32)

    with torch.no_grad():
        for layer in model:
            x = torch.relu(linear(layer.a, x))
            if isinstance(layer, BrokenNormLayer):
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.eps)
            x = x + linear(layer.b, x)
    return x


class BrokenNormLayer(BrokenLayer):
    """``BrokenLayer`` with a normalization after the break whose epsilon is a float attribute:
    under ``dynamic=True`` Dynamo lifts it to a tensor input that the graph reads with ``.item()``."""

    def __init__(self, d, eps):
        super().__init__(d)
        self.eps = eps

    def forward(self, x):
        x = torch.relu(self.a(x))
        torch._dynamo.graph_break()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x + self.b(x)


@pytest.mark.parametrize("target", ["reference", "inductor"])
@pytest.mark.parametrize("norm", [False, True])
def test_one_graph_serving_several_layers_with_dynamic_shapes(target, norm):
    """dynamic=True: the graph after the break serves every layer at new sizes; each layer gets
    its own weights and, where the graph reads a lifted float, its own epsilon."""
    torch.manual_seed(0)
    layers = [BrokenNormLayer(32, eps) if norm else BrokenLayer(32) for eps in (1e-6, 0.5, 4.0)]
    model = nn.Sequential(*layers).eval()
    fast = torch.compile(model, backend="qcompile", dynamic=True, options={"recipe": "w8a8", "target": target})
    for shape in ((4, 32), (9, 32), (2, 5, 32)):
        x = torch.randn(shape)
        assert rel_err(fast(x), _w8a8_eager(model, x)) < 1e-4, shape


def test_the_users_model_is_never_modified():
    torch.manual_seed(0)
    model = Stack()
    x = with_outlier_channels(torch.randn(2, 8, 48))
    before = copy.deepcopy(model.state_dict())
    ref = model(x)
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    compile_q(model, recipe="w8a8-smoothquant", alpha="auto")(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(model(x), ref)  # eager calls still give the FP32 results


def test_calibrating_the_compiled_model_recompiles_with_statistics():
    torch.manual_seed(0)
    model = Stack()
    x = with_outlier_channels(torch.randn(2, 8, 48))
    fast = compile_q(model, recipe="w8a8-smoothquant-dynamic", target="reference")
    with qcompiler.calibrate(fast, progress=False):  # runs eagerly: nothing compiles yet
        ref = fast(x)
    assert torch.equal(ref, model(x))
    out = fast(x)
    assert sqnr_db(ref, out) > 30
    assert all(r.sqnr_db is not None and r.smoothing for r in qcompiler.explain(fast) if r.op == "linear")


def test_a_graph_compiled_before_calibration_rebuilds_after_it():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 8, 48)
    fast = compile_q(model, recipe="w8a8", target="reference")
    fast(x)
    assert all(r.sqnr_db is None for r in qcompiler.explain(fast) if r.op == "linear")
    with qcompiler.calibrate(fast, progress=False):
        fast(x)
    fast(x)
    assert all(r.sqnr_db > 30 for r in qcompiler.explain(fast) if r.op == "linear")


def test_static_recipe_without_calibration_says_what_to_do():
    model = Stack()
    with pytest.raises(Exception, match=r"calibrat.*qcompiler\.calibrate"):
        compile_q(model, recipe="w8a8-static")(torch.randn(2, 4, 48))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_is_rejected(bad):
    model = Stack()
    x = torch.randn(2, 4, 48)
    x[0, 1, 2] = bad
    with pytest.raises(qcompiler.CalibrationError, match="input of .blocks.0.q. contains NaN or Inf"):
        with qcompiler.calibrate(model, [x], progress=False):
            pass


def test_empty_calibration_is_rejected():
    with pytest.raises(qcompiler.CalibrationError, match="saw no data"):
        with qcompiler.calibrate(Stack(), [], progress=False):
            pass


@pytest.mark.parametrize("options,match", [
    ({"recipe": "int3"}, "unknown recipe 'int3'"),
    ({"target": "tpu"}, "unknown target 'tpu'"),
    ({"alhpa": 0.5}, "unknown qcompile option"),
    ({"cuda_graphs": True}, r"cuda_graphs=True needs the model and inputs on a CUDA device"),
    ({"cuda_graphs": "yes"}, "cuda_graphs must be True or False"),
])
def test_bad_options_fail_with_the_valid_choices(options, match):
    with pytest.raises(Exception, match=match):
        compile_q(Stack(), **options)(torch.randn(1, 2, 48))


def test_options_reach_the_passes():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 8, 48)
    fast = compile_q(model, recipe="w8a8", skip=["lm_head"], overrides={"*.down": "w8a16"})
    fast(x)
    schemes = {r.module: r.scheme for r in qcompiler.explain(fast)}
    assert schemes["lm_head"] == "floating point"
    assert schemes["blocks.0.down"] == "w8a16" and schemes["blocks.0.q"] == "w8a8"


@pytest.mark.parametrize("seed", range(6))
def test_random_small_models(seed):
    """Random depth, widths, norms and recipes: the compiled model stays close to FP32, and
    every target computes what the reference target computes."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]
    torch.manual_seed(seed)
    d = 2 * int(torch.randint(8, 40, (1,), generator=g))  # even, so k/v halves exist
    model = Stack(n=pick([1, 2, 3]), d=d, h=int(torch.randint(9, 100, (1,), generator=g)),
                  norm=pick(["rms", "layer"]), head=int(torch.randint(3, 50, (1,), generator=g)))
    recipe = pick(["w8a8", "w8a16", "w8a8-static", "w8a8-smoothquant", "w8a8-smoothquant-dynamic"])
    x = with_outlier_channels(torch.randn(2, int(torch.randint(1, 20, (1,), generator=g)), d), factor=8.0)
    with qcompiler.calibrate(model, [x, torch.randn_like(x)], progress=False):
        pass
    outs = {}
    for target in TARGETS:
        torch._dynamo.reset()
        outs[target] = compile_q(model, recipe=recipe, target=target, alpha="auto")(x) \
            if "smoothquant" in recipe else compile_q(model, recipe=recipe, target=target)(x)
    assert sqnr_db(model(x), outs["reference"]) > 20, recipe
    for target in TARGETS[1:]:  # the same q-ops: only float32 rounding may differ
        assert rel_err(outs[target], outs["reference"]) < 1e-4, (recipe, target)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()  # the resumed frame's root is this submodule
        return self.b(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x)


def test_full_module_names_after_a_graph_break_inside_a_submodule():
    torch.manual_seed(0)
    model, x = Outer().eval(), torch.randn(3, 16)
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    fast = compile_q(model, skip=["inner.b"], target="reference")
    fast(x)
    schemes = {r.module: r.scheme for r in qcompiler.explain(fast)}
    assert schemes == {"inner.a": "w8a8", "inner.b": "floating point"}


def test_forget_drops_statistics_and_graphs_rebuild_without_them():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(2, 8, 48)
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    fast = compile_q(model, recipe="w8a8", target="reference")
    fast(x)
    assert all(r.sqnr_db is not None for r in qcompiler.explain(fast) if r.op == "linear")
    qcompiler.calibration.state.forget(model)
    assert qcompiler.calibration.state.stats_for(model.lm_head.weight) is None
    fast(x)
    assert all(r.sqnr_db is None for r in qcompiler.explain(fast) if r.op == "linear")


def test_calibrating_another_model_does_not_rebuild_this_one():
    torch.manual_seed(0)
    model, other, x = Stack(), Stack(), torch.randn(2, 8, 48)
    fast = compile_q(model, target="reference")
    fast(x)
    graphs = qcompiler.api.backend.compiled_graphs(fast)
    assert len(graphs) == 1
    built = graphs[0].graph_module
    with qcompiler.calibrate(other, [x], progress=False):
        pass
    fast(x)
    assert graphs[0].graph_module is built      # unrelated statistics: no rebuild
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    fast(x)
    assert graphs[0].graph_module is not built  # its own statistics changed: rebuilt


def test_cuda_graphs_are_refused_where_the_target_cannot_take_them():
    from qcompiler.api.backend import _lowering_options
    from qcompiler.lowering import get_lowering

    with pytest.raises(ValueError, match=r"target 'reference' cannot run in CUDA graphs; use one of \['inductor', 'triton'\]"):
        _lowering_options(get_lowering("reference"), True, "cuda")
    assert _lowering_options(get_lowering("triton"), True, "cuda") == {"cuda_graphs": True}
    assert _lowering_options(get_lowering("ort"), False, "cpu") == {}


def test_inputs_dynamo_marks_static_stay_static_through_the_passes(monkeypatch):
    # CUDA graphs replay in place only on inputs AOTAutograd knows as static (parameters, a
    # StaticCache's tensors); copying Dynamo's graph for the passes used to lose what it reads
    # (seen on the H100: "skipping cudagraphs due to mutated inputs"). The static indices are
    # computed the same way on the CPU, so they are checked here.
    import torch._inductor.compile_fx as compile_fx

    seen = []
    original = compile_fx.get_static_input_idxs

    def spy(num_fixed):
        static = original(num_fixed)
        info = torch._guards.TracingContext.get().fw_metadata.input_info
        seen.append((static, [i for i, a in enumerate(info) if a.mutates_data], len(info)))
        return static

    monkeypatch.setattr(compile_fx, "get_static_input_idxs", spy)

    class WithCache(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(48, 48)

        def forward(self, x, cache):
            cache.add_(1.0)  # mutated in place, as a KV cache is
            return self.proj(x) + cache

    cache = torch.zeros(48)
    torch._dynamo.mark_static_address(cache)
    model = WithCache().eval()
    torch._dynamo.reset()
    out = compile_q(model, recipe="w8a16", target="inductor")(torch.randn(2, 48), cache)
    assert out.shape == (2, 48) and torch.equal(cache, torch.ones(48))
    assert seen, "Inductor did not ask for the static inputs"
    (static, mutated, n_inputs), = seen
    assert len(mutated) == 1 and mutated[0] in static  # what CUDA graphs need to replay in place
    assert len(static) == n_inputs - 1  # every input but x: parameters, the passes' buffers, the cache


def _fake_int8(t: torch.Tensor, dim) -> torch.Tensor:
    """Symmetric INT8 round trip of float64 ``t`` with one scale per slice along ``dim`` (None: one
    for the whole tensor), written out here from the convention: scale = max|t| / 127 in float32,
    codes rounded half to even and clamped to [-128, 127]."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim, keepdim=True)
    scale = (amax.float().clamp_min(1e-12) / 127).double()
    return (t / scale).round().clamp(-128, 127) * scale


@pytest.mark.parametrize("recipe", ["w8a16", "w8a8", "w8a8-static"])
def test_explained_sqnr_is_measured_again_independently(recipe):
    """The per-layer SQNR that ``explain`` reports (and the guards and ``auto`` act on) equals, within
    0.1 dB, the SQNR measured here on each linear's calibration inputs (hooked, in float64) with
    the recipe's quantization written out in the test."""
    torch.manual_seed(0)
    model = Stack()
    x = with_outlier_channels(torch.randn(2, 8, 48), factor=8.0)  # 16 rows: all kept by calibration
    seen, linears = {}, {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    def record(name):
        def hook(_, args):
            seen.setdefault(name, args[0].detach().double())
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in linears.items()]
    with qcompiler.calibrate(model, [x], progress=False):
        pass
    for h in hooks:
        h.remove()
    fast = compile_q(model, recipe=recipe, target="reference", min_sqnr_db=None, max_static_loss_db=None)
    fast(x)
    reported = {r.module: r.sqnr_db for r in qcompiler.explain(fast) if r.op == "linear"}
    assert reported.keys() == linears.keys()
    for name, m in linears.items():
        rows = seen[name].reshape(-1, m.in_features)
        w = m.weight.detach().double()
        b = None if m.bias is None else m.bias.detach().double()
        ref = nn.functional.linear(rows, w, b)
        x_hat = {"w8a16": rows, "w8a8": _fake_int8(rows, -1), "w8a8-static": _fake_int8(rows, None)}[recipe]
        out = nn.functional.linear(x_hat, _fake_int8(w, -1), b)
        expect = 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()).item()
        assert abs(reported[name] - expect) < 0.1, (name, reported[name], expect)
