"""Kernel choice by measurement: the choice logic with a fake timer, every candidate of every linear
family against its q-op reference, tinygemm's layout, and the planned op's dispatch by M.

On the CPU the kernels run in Triton's interpreter (conftest); torch's CUDA-only candidates
(tinygemm, ``_scaled_mm``, ``_int_mm``) say why they cannot run and are checked on a GPU.
"""
import pytest
import torch

from conftest import rel_err

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install 'qcompiler[gpu]')")

import qcompiler  # noqa: E402
from qcompiler.ir import int4, ops  # noqa: E402
from qcompiler.runtimes import kernel_choice, linear_kernels, tinygemm  # noqa: E402
from qcompiler.runtimes.kernel_choice import Chooser, Family, Kernel  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fresh(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


def w4_args(k=128, n=48, group=32, symmetric=False, dtype=torch.bfloat16, bias=True):
    p = int4.quantize(fresh(n, k), group, symmetric)
    return (fresh(1, k, dtype=dtype), p.packed, p.scale, p.zero, None, group, fresh(n) if bias else None)


class FakeTimer:
    """Times from a table (kernel name -> us) by which kernel's run is being timed."""

    def __init__(self, times):
        self.times, self.calls = times, []

    def __call__(self, fn):
        import inspect

        kernel = inspect.getclosurevars(fn).nonlocals.get("kernel")
        name = kernel.name if kernel is not None else "baseline"
        self.calls.append(name)
        return self.times.get(name, 100.0)


# ----------------------------------------------------------------------------- the choice logic

def test_the_fastest_correct_kernel_is_kept_and_its_speed_against_float_reported():
    timer = FakeTimer({"triton_gemv": 9.0, "dequant_cublas": 30.0, "triton_gemv_unsplit": 4.0, "triton_packed_gemm": 7.0,
                       "triton_packed_gemv": 5.0, "baseline": 12.0})
    choice = Chooser(timer).choose(linear_kernels.W4A16, w4_args(), 1)
    assert choice.kernel == "triton_gemv_unsplit" and choice.measured
    assert choice.speedup == pytest.approx(3.0)
    assert "tinygemm" in choice.rejected or DEVICE.type == "cuda"
    assert "3.00x the float linear" in choice.describe()


def test_a_kernel_with_a_wrong_result_is_never_kept_however_fast():
    good = linear_kernels.W4A16.kernel("triton_gemv")
    wrong = Kernel("wrong", lambda a, p: good.run(a, p) * 1.1)
    nan = Kernel("nan", lambda a, p: good.run(a, p) * float("nan"))
    family = Family("linear_w4a16", (wrong, nan, good), ops.linear_w4a16_ref, linear_kernels.W4A16.with_rows,
                    linear_kernels.W4A16.shape, linear_kernels.W4A16.baseline)
    choice = Chooser(FakeTimer({"wrong": 1.0, "nan": 0.5, "triton_gemv": 50.0})).choose(family, w4_args(), 1)
    assert choice.kernel == "triton_gemv"
    assert "relative error" in choice.rejected["wrong"] and "nan" in choice.rejected["nan"].lower()


def test_a_kernel_that_fails_to_run_is_reported_not_raised():
    good = linear_kernels.W8A16.kernel("triton_gemv")

    def broken(a, p):
        raise RuntimeError("no kernel image for this device")
    family = Family("linear_w8a16", (Kernel("broken", broken), good), ops.linear_w8a16_ref,
                    linear_kernels.W8A16.with_rows, linear_kernels.W8A16.shape, linear_kernels.W8A16.baseline)
    wq, ws = ops.quantize_per_channel_ref(fresh(24, 64))
    choice = Chooser(FakeTimer({})).choose(family, (fresh(1, 64), wq, ws, None), 1)
    assert choice.kernel == "triton_gemv" and "no kernel image" in choice.rejected["broken"]


def test_measurements_are_kept_on_disk_and_a_second_process_times_nothing(tmp_path):
    args = w4_args()
    first = FakeTimer({"triton_packed_gemm": 1.0})
    assert Chooser(first, tmp_path).choose(linear_kernels.W4A16, args, 1).kernel == "triton_packed_gemm"
    assert first.calls
    second = FakeTimer({"triton_gemv": 1.0})  # another process, other timings: the disk answers
    choice = Chooser(second, tmp_path).choose(linear_kernels.W4A16, args, 1)
    assert choice.kernel == "triton_packed_gemm" and choice.cached and second.calls == []
    # another shape is measured anew
    assert Chooser(second, tmp_path).choose(linear_kernels.W4A16, w4_args(k=256), 1).kernel == "triton_gemv"
    # an unreadable cache file is measured again, not an error
    for f in tmp_path.iterdir():
        f.write_text("{not json")
    assert Chooser(FakeTimer({"dequant_cublas": 1.0}), tmp_path).choose(linear_kernels.W4A16, args, 1).kernel == "dequant_cublas"


def test_without_a_timer_the_first_kernel_that_can_run_is_taken():
    chooser = Chooser(None)
    assert chooser.choose(linear_kernels.W4A16, w4_args(), 1).kernel == "triton_gemv"
    choice = chooser.choose(linear_kernels.W4A16, w4_args(), 64)
    assert choice.kernel == "dequant_cublas" and not choice.measured
    assert "M <= 16" in choice.rejected["triton_gemv"]


# ----------------------------------------------------------------------------- every candidate is right

def _w8a8_args(qdtype, per_token):
    wq, ws = ops.quantize_per_channel_ref(fresh(40, 96), qdtype)
    xs = torch.ones(2, 1, device=DEVICE) if per_token else torch.tensor(0.02, device=DEVICE)
    return (torch.empty(1, 96, dtype=qdtype, device=DEVICE), xs, wq, ws, fresh(40), torch.bfloat16)


CASES = {
    "w4a16 g32 asym bf16": (linear_kernels.W4A16, lambda: w4_args()),
    "w4a16 g16 sym fp16": (linear_kernels.W4A16, lambda: w4_args(k=96, group=16, symmetric=True, dtype=torch.float16)),
    "w4a16 g64 fp32 K off the group": (linear_kernels.W4A16, lambda: w4_args(k=100, group=64, dtype=torch.float32)),
    "w8a16 bf16": (linear_kernels.W8A16, lambda: (fresh(1, 80, dtype=torch.bfloat16),
                                                  *ops.quantize_per_channel_ref(fresh(24, 80)), None)),
    "w8a8 int8 per token": (linear_kernels.W8A8, lambda: _w8a8_args(torch.int8, True)),
    "w8a8 fp8 per tensor": (linear_kernels.W8A8, lambda: _w8a8_args(ops.FP8, False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("m", [1, 5, 33])
def test_every_candidate_that_can_run_matches_the_reference(case, m):
    family, make = CASES[case]
    args = make()
    chooser = Chooser(None)
    ran = 0
    for kernel in family.kernels:
        ok, why = kernel.can_run(args, m)
        if not ok:
            assert why  # a kernel that cannot run says why
            continue
        call = family.with_rows(args, m)
        prepared = kernel.prepare(call) if kernel.prepare else ()
        out = kernel.run(call, prepared)
        ref = family.reference(*call)
        assert out.shape == ref.shape
        assert rel_err(out, ref) < 5e-3, kernel.name
        assert chooser.check(family, kernel, args, m) == (True, "")
        ran += 1
    assert ran >= 1


# ----------------------------------------------------------------------------- tinygemm's layout

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 128])
def test_tinygemm_scales_and_zeros_give_the_reference_weight(symmetric, group):
    p = int4.quantize(torch.randn(16, 256), group, symmetric)
    sz = tinygemm.scales_and_zeros(p.scale, p.zero)
    assert sz.shape == (256 // group, 16, 2) and sz.dtype == torch.bfloat16
    ref = int4.dequantize(p.packed, p.scale, p.zero, group, 256)
    # the only difference: scale and zero rounded to bf16 once (module docstring)
    assert rel_err(tinygemm.dequantized(p.packed, sz, group), ref) < 4e-3
    # the nibble swap tinygemm's CUDA converter reads: high nibble = even column
    swapped = tinygemm.tinygemm_codes(p.packed)
    assert torch.equal(swapped >> 4, p.packed & 0x0F) and torch.equal(swapped & 0x0F, p.packed >> 4)


def test_tinygemm_dequantizes_as_torch_int4_kernels_do_on_the_cpu():
    # torch's CPU twin of tinygemm reads the same [K / g, N, 2] scales and zeros: it proves the
    # (q - 8) * scale + zero convention the CUDA kernel is fed
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4pack kernel")
    p = int4.quantize(torch.randn(32, 256), 64, False)
    codes = torch.stack([p.packed & 0x0F, p.packed >> 4], -1).reshape(32, 256).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    x = torch.randn(3, 256).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, tinygemm.scales_and_zeros(p.scale, p.zero))
    ref = ops.linear_w4a16_ref(x.float(), p.packed, p.scale, p.zero, None, 64, None)
    assert rel_err(y, ref) < 1e-2


def test_tinygemm_says_why_it_cannot_run():
    cpu = torch.device("cpu")
    assert "CUDA" in tinygemm.can_run(torch.bfloat16, cpu, 64, 256, 256, 32)[1]
    assert tinygemm.inner_k_tiles(4096) == 8 and tinygemm.inner_k_tiles(96) == 2 and tinygemm.inner_k_tiles(40) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tinygemm runs on CUDA")
@pytest.mark.parametrize("symmetric", [True, False])
def test_tinygemm_on_the_gpu_matches_the_reference(symmetric):
    args = w4_args(k=4096, n=256, group=128, symmetric=symmetric)
    kernel = linear_kernels.W4A16.kernel("tinygemm")
    for m in (1, 16, 200):
        assert kernel.can_run(args, m) == (True, "")
        assert Chooser(None).check(linear_kernels.W4A16, kernel, args, m) == (True, "")


# ----------------------------------------------------------------------------- the plan in a compiled graph

def test_a_dynamic_graph_runs_each_bucket_on_its_own_kernel(monkeypatch):
    from qcompiler.runtimes import triton_packed, triton_weight_only

    per_m = {1: "triton_gemv_unsplit", 16: "triton_gemv", 128: "triton_packed_gemm", 2048: "dequant_cublas"}

    def choose(self, family, args, m):
        times = {k.name: (1.0 if k.name == per_m[m] else 5.0) for k in family.kernels if k.can_run(args, m)[0]}
        return kernel_choice.Choice(family.op, m, per_m[m], times, {}, 2.0)
    monkeypatch.setattr(Chooser, "choose", choose)
    ran = []
    launch = triton_weight_only.linear_w4a16

    def recorded(*a, split_k=None, path=None):
        ran.append((a[0].reshape(-1, a[0].shape[-1]).shape[0], path, split_k))
        return launch(*a, split_k=split_k, path=path)
    monkeypatch.setattr(triton_weight_only, "linear_w4a16", recorded)
    packed = triton_packed.linear_packed

    def recorded_packed(*a):
        ran.append((a[0].reshape(-1, a[0].shape[-1]).shape[0], f"packed {a[-1]}", None))
        return packed(*a)
    monkeypatch.setattr(triton_packed, "linear_packed", recorded_packed)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64)).eval()
    reference = torch.compile(model, backend="qcompile", options={"recipe": "w4a16", "target": "reference"})
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16", "target": "triton"}, dynamic=True)
    for rows in (3, 1, 40, 300):
        x = torch.randn(rows, 64)
        assert rel_err(fast(x), reference(x)) < 1e-5
    # M = 3 and 1 fall in the two GEMV buckets, 40 in the GEMM's, 300 in dequantize + GEMM's
    assert [r for r in ran if r[0] in (1, 3, 40, 300)] == [
        (3, "gemv", None), (3, "gemv", None), (1, "gemv", 1), (1, "gemv", 1),
        (40, "packed gemm", None), (40, "packed gemm", None), (300, "dequant", None), (300, "dequant", None)]
    report = str(qcompiler.explain(fast))
    assert "triton_gemv_unsplit (M=1: 1.0 us, 2.00x the float linear)" in report
    assert "triton_packed_gemm (M=128" in report and "dequant_cublas (M=2048" in report


def test_a_static_graph_has_one_plan_entry_for_its_own_m():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96)).eval()
    x = torch.randn(2, 20, 64)
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "target": "triton"})
    ref = torch.compile(model, backend="qcompile", options={"recipe": "w8a16", "target": "reference"})
    y = fast(x)
    assert rel_err(y, ref(x)) < 1e-5
    assert "linear_w8a16 dequant_cublas (M=40; not measured here)" in str(qcompiler.explain(fast))


def test_packed_kernels_share_one_prepared_copy_and_match_the_reference(monkeypatch):
    # the GEMV and the GEMM on packed words, chosen for different M buckets of one dynamic graph:
    # each weight is re-packed once (both kernels share the layout), and every call matches the
    # reference target
    from qcompiler.runtimes import triton_packed

    per_m = {1: "triton_packed_gemv", 16: "triton_packed_gemm", 128: "triton_packed_gemm", 2048: "dequant_cublas"}

    def choose(self, family, args, m):
        return kernel_choice.Choice(family.op, m, per_m[m], {per_m[m]: 1.0}, {}, 2.0)
    monkeypatch.setattr(Chooser, "choose", choose)
    paths = []
    launch = triton_packed.linear_packed

    def recorded(*a):
        paths.append(a[-1])
        return launch(*a)
    monkeypatch.setattr(triton_packed, "linear_packed", recorded)
    packed = []
    prepare = triton_packed.prepare_w4
    monkeypatch.setattr(triton_packed, "prepare_w4", lambda *a: packed.append(tuple(a[0].shape)) or prepare(*a))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64)).eval()
    options = {"recipe": "w4a16"}
    reference = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
    fast = torch.compile(model, backend="qcompile", options={**options, "target": "triton"}, dynamic=True)
    for rows in (3, 1, 40):
        x = torch.randn(rows, 64)
        assert rel_err(fast(x), reference(x)) < 1e-5
    assert paths == ["gemm", "gemm", "gemv", "gemv", "gemm", "gemm"]
    # the dynamic graph (rows 3, 40) packs each weight once for both kernels; Dynamo compiles
    # rows = 1 as a graph of its own (it specializes sizes 0 and 1), which packs them again
    assert packed == [(96, 64), (64, 64)] * 2
    report = str(qcompiler.explain(fast))
    assert "triton_packed_gemv (M=1" in report and "triton_packed_gemm (M=16" in report
