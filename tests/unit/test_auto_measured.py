"""``target="auto"`` on CUDA: the triton target where its kernels measured faster, else Inductor;
attention kernels chosen against SDPA. The choice logic runs with a fake timer on the CPU (the
kernels in Triton's interpreter; conftest), with ``auto`` pointed at the CUDA list.
"""
import inspect
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

import qcompiler  # noqa: E402
from qcompiler import lowering  # noqa: E402
from qcompiler.lowering.triton_plan import speed_against_float  # noqa: E402
from qcompiler.runtimes import attention_kernels as ak  # noqa: E402
from qcompiler.runtimes.kernel_choice import Choice, Chooser  # noqa: E402
from qcompiler.runtimes.triton_support import available  # noqa: E402
from tiny_models import build, token_batch  # noqa: E402

pytestmark = pytest.mark.skipif(not available(torch.device("cpu")),
                                reason="the triton target needs a GPU or TRITON_INTERPRET=1")


class Timer:
    """Fake times: a kernel by name, the float linear as ``linear``, SDPA as ``sdpa``."""

    def __init__(self, **times):
        self.times = times

    def __call__(self, fn):
        names = inspect.getclosurevars(fn).nonlocals
        if "kernel" in names:
            return self.times.get(names["kernel"].name, 5.0)
        return self.times["linear"] if "xf" in names else self.times["sdpa"]


@pytest.fixture
def auto_is_cuda(monkeypatch):
    """``auto`` on these CPU tensors decides as on CUDA; returns a setter for the fake times."""
    monkeypatch.setitem(lowering.AUTO, "cpu", lowering.AUTO["cuda"])
    timer = Timer(linear=5.0, sdpa=5.0)
    monkeypatch.setattr(Chooser, "for_device",
                        classmethod(lambda cls, device, code_files=(): cls(timer, None, code_files, "fake GPU")))
    return timer.times.update


def _choice(m, kernel_us, float_us, measured=True):
    return Choice("linear_w4a16", m, "k", {"k": kernel_us}, {}, float_us, measured)


def test_the_graph_speed_is_the_geometric_mean_over_m_buckets_of_summed_times():
    choices = [("a", _choice(1, 10.0, 30.0)), ("b", _choice(1, 20.0, 30.0)), ("a", _choice(2048, 400.0, 200.0)),
               ("b", _choice(2048, 400.0, 200.0))]
    ratio, text = speed_against_float(choices)
    assert ratio == pytest.approx((2.0 * 0.5) ** 0.5)  # M=1: 60/30; M=2048: 400/800
    assert "its 2 linear(s)" in text and "M=1: 2.00x" in text and "M=2048: 0.50x" in text
    assert speed_against_float(choices + [("c", _choice(1, 1.0, 2.0, measured=False))])[0] is None
    assert speed_against_float([])[0] is None


def test_auto_lists_triton_first_on_cuda_and_says_why_it_passed_it_over(monkeypatch):
    inputs = [torch.empty(2, 3)]
    assert lowering.auto_choice("cuda", inputs) == ("triton", "")  # the interpreter runs the kernels here
    monkeypatch.setitem(lowering.LOWERINGS, "triton",
                        replace(lowering.LOWERINGS["triton"], can_run=lambda e: (False, "no GPU here")))
    assert lowering.auto_choice("cuda", inputs) == ("inductor", "triton: no GPU here")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64)).eval()


@pytest.mark.parametrize("recipe", ["w8a16", "w4a16", "w8a8"])
@pytest.mark.parametrize("float_us,runs", [(10.0, "triton"), (1.0, "inductor")])
def test_auto_keeps_triton_only_where_its_linears_measured_faster(auto_is_cuda, recipe, float_us, runs):
    auto_is_cuda(linear=float_us)
    model, x = _mlp(), torch.randn(4, 64)
    expected = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": "reference"})(x)
    fast = torch.compile(model, backend="qcompile", options={"recipe": recipe})
    assert rel_err(fast(x), expected) < 1e-4
    report = qcompiler.explain(fast)
    [graph] = report.graphs
    assert graph.requested == "auto" and graph.running == runs
    ratio = f"{float_us / 5.0:.2f}x"
    if runs == "triton":
        assert graph.reason == f"auto kept triton: its 2 linear(s) measured {ratio} the float linears of the same shapes (M=4: {ratio})"
        assert any(f"{ratio} the float linear)" in line for line in report.notes)
    else:
        assert f"triton: its 2 linear(s) measured {ratio}" in graph.reason and "not faster; compiled by Inductor" in graph.reason
        assert not any("the float linear)" in line for line in report.notes)  # no kernel of the plan runs


def test_a_graph_that_gave_way_keeps_no_prepared_weight(auto_is_cuda):
    # the packed GEMM measured fastest of the triton kernels (its weights re-packed), yet slower
    # than the float linears: Inductor runs, and the re-packed copies are not kept in memory
    from qcompiler.lowering.triton_plan import PREPARED_PREFIX

    auto_is_cuda(linear=3.0, triton_packed_gemm=4.0)
    model, x = _mlp(), torch.randn(4, 64)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16"})
    fast(x)
    graph = qcompiler.api.backend.compiled_graphs(fast)[0]
    assert graph.running_target == "inductor" and "0.75x" in graph.fallback_reason
    prepared = [b for name, b in graph.graph_module.named_buffers() if name.startswith(PREPARED_PREFIX)]
    assert prepared and all(b.device.type == "meta" for b in prepared)


def test_an_explicit_triton_target_runs_its_kernels_however_they_measured(auto_is_cuda):
    auto_is_cuda(linear=1.0)
    model, x = _mlp(), torch.randn(4, 64)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "target": "triton"})
    fast(x)
    [graph] = qcompiler.explain(fast).graphs
    assert graph.running == "triton" and graph.reason == ""


def _attention_targets(model) -> set:
    graph = qcompiler.api.backend.compiled_graphs(model)[0]
    return {str(n.target) for n in graph.graph_module.graph.nodes if "attention" in str(n.target)}


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.float32), ("phi3", torch.float32),
                                        ("llama", torch.bfloat16)])
def test_auto_runs_sdpa_where_the_8bit_attention_kernel_measured_slower(auto_is_cuda, arch, dtype):
    # the linears measured faster (triton kept), the 8-bit attention slower than SDPA: the
    # attention runs SDPA on its floating-point operands, exactly the float attention
    auto_is_cuda(linear=10.0, sdpa=1.0)
    model, vocab = build(arch, dtype=dtype)
    batch = token_batch(vocab, 2, 9, padded=True)
    with torch.no_grad():
        float_attention = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "target": "reference"})(**batch).logits
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "attention": "int8"})
        out = fast(**batch).logits
    live = batch["attention_mask"].bool()
    assert rel_err(out[live].float(), float_attention[live].float()) < (1e-4 if dtype == torch.float32 else 2e-2)
    assert "qcompile_triton.attention_q8.default" not in _attention_targets(fast)
    report = qcompiler.explain(fast)
    assert report.graphs[0].running == "triton"
    assert any("attention_q8 runs sdpa (floating point), the 8-bit kernel measured slower; measured triton (Lq=9, "
               "Lk=9: 5.0 us, 0.20x SDPA)" in line for line in report.notes), report.notes


@pytest.mark.parametrize("target,sdpa_us,kernel_runs", [("auto", 10.0, True), ("triton", 1.0, True)])
def test_the_8bit_attention_kernel_runs_where_faster_or_asked_for(auto_is_cuda, target, sdpa_us, kernel_runs):
    auto_is_cuda(linear=10.0, sdpa=sdpa_us)
    model, vocab = build("llama")
    batch = token_batch(vocab, 2, 9, padded=True)
    with torch.no_grad():
        fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "attention": "int8", "target": target})
        fast(**batch)
    assert ("qcompile_triton.attention_q8.default" in _attention_targets(fast)) == kernel_runs
    ratio = f"{sdpa_us / 5.0:.2f}x SDPA"
    assert any(f"attention_q8 triton (Lq=9, Lk=9: 5.0 us, {ratio})" in line for line in qcompiler.explain(fast).notes)


# ----------------------------------------------------------------------------- quantized KV cache

def _kv_call(scheme="int8", lq=1, lk=40):
    return ak.kv_args(1, 4, 2, lq, lk, 16, torch.float32, None, False, None, scheme, 16, 16, torch.device("cpu"))


@pytest.mark.parametrize("scheme", ["int8", "fp8", "int4"])
def test_both_quantized_kv_candidates_compute_the_qop(scheme):
    args = _kv_call(scheme)
    assert args[1].shape[2] == 32 and args[4].shape[2] == 8  # whole blocks as codes, the rest as the tail
    for kernel in ak.ATTENTION_QUANTIZED_KV.kernels:
        assert Chooser(None).check(ak.ATTENTION_QUANTIZED_KV, kernel, args, 1) == (True, ""), kernel.name


@pytest.mark.parametrize("kernel_us,kept", [(1.0, "triton"), (9.0, "dequant_sdpa")])
def test_the_faster_quantized_kv_candidate_is_kept(kernel_us, kept):
    timer = Timer(triton=kernel_us, dequant_sdpa=3.0, sdpa=2.0)
    choice = Chooser(timer).choose(ak.ATTENTION_QUANTIZED_KV, _kv_call(), 1)
    assert choice.kernel == kept
    assert choice.describe() == f"{kept} (Lq=1, Lk=40: {min(kernel_us, 3.0):.1f} us, {2.0 / min(kernel_us, 3.0):.2f}x SDPA over a floating-point cache)"


def test_attention_is_measured_at_its_own_lengths_or_at_a_long_cache():
    assert ak.points(1, 40) == [(1, 40)]
    assert ak.points(1, None) == [(1, ak.LENGTH)]
    assert ak.points(None, None) == [(1, ak.LENGTH), (ak.LENGTH, ak.LENGTH)]


@pytest.mark.parametrize("kernel_us,runs_kernel", [(1.0, True), (9.0, False)])
def test_decode_over_a_quantized_cache_runs_the_faster_candidate(auto_is_cuda, monkeypatch, kernel_us, runs_kernel):
    from tiny_models import assert_same_generation

    auto_is_cuda(triton=kernel_us, dequant_sdpa=3.0, sdpa=2.0, linear=1.0)
    monkeypatch.setattr(ak, "LENGTH", 48)  # a dynamic cache is measured at 48 tokens here (the interpreter is slow)
    model, vocab = build("llama")
    prompt = token_batch(vocab, 1, 40, seed=3)
    outs, graphs = [], []
    with torch.no_grad():
        for compiled in (False, True):
            m = build("llama")[0]
            if compiled:
                torch._dynamo.reset()
                m.forward = torch.compile(m.forward, backend="qcompile",
                                          options={"recipe": "w8a16", "skip": ["*"], "target": "triton"})
            cache = qcompiler.QuantizedKVCache(m.config, "int8", group_size=16, residual=8)
            outs.append(m.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=0, cache=cache,
                                   output_logits=True, return_dict_in_generate=True))
            graphs = qcompiler.api.backend.compiled_graphs(m) if compiled else graphs
    assert_same_generation(*outs, start=prompt["input_ids"].shape[1])
    targets = set().union(*({str(n.target) for n in g.graph_module.graph.nodes} for g in graphs))
    fused = [t for t in targets if "attention_quantized_kv" in t]
    assert fused and all(("qcompile_triton" in t) == runs_kernel for t in fused), fused
    report = "\n".join(qcompiler.explain(m).notes)
    assert ("runs dequant_sdpa at every length" in report) != runs_kernel
