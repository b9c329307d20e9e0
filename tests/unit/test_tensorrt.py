"""TensorRT engines (``qcompiler.build_engine``, ``target="tensorrt"``, ``qcompile build-engine``), tested up to
the point where TensorRT itself is needed: the optimization profile from a real export, the errors
without TensorRT or a GPU, and a real build that runs only where TensorRT and a CUDA device exist."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.runtimes import tensorrt_engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "TensorRT is not installed here: its PyPI wheels download from NVIDIA's own index, which this machine cannot reach"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 8, 32, generator=g) for _ in range(2)]
    path = tmp_path_factory.mktemp("trt") / "m.onnx"
    result = qcompiler.export_onnx(model, batches[0], str(path), recipe="w8a8-static", calibration=batches)
    assert not result.violations
    return path


def test_the_default_profile_spans_the_dynamic_batch_and_sequence(exported):
    profile = tensorrt_engine.profile_shapes(exported, max_batch=16, max_seq=2048, opt_batch=2, opt_seq=256)
    (name, (lo, opt, hi)), = profile.items()
    assert (lo, opt, hi) == ((1, 1, 32), (2, 256, 32), (16, 2048, 32))
    assert name == tensorrt_engine.input_names(exported)[0]


def test_an_explicit_profile_is_checked_against_the_model(exported):
    name = tensorrt_engine.input_names(exported)[0]
    good = {name: ((1, 4, 32), (4, 64, 32), (8, 512, 32))}
    assert tensorrt_engine.profile_shapes(exported, good)[name] == good[name]
    with pytest.raises(qcompiler.OptionError, match="axis 2 is static \\(32\\)"):
        tensorrt_engine.profile_shapes(exported, {name: ((1, 4, 16), (4, 64, 16), (8, 512, 16))})
    with pytest.raises(qcompiler.OptionError, match="min <= opt <= max"):
        tensorrt_engine.profile_shapes(exported, {name: ((1, 64, 32), (4, 4, 32), (8, 512, 32))})
    with pytest.raises(qcompiler.OptionError, match="not inputs of the model"):
        tensorrt_engine.profile_shapes(exported, {"nope": good[name]})
    with pytest.raises(qcompiler.OptionError, match="opt_batch <= max_batch"):
        tensorrt_engine.profile_shapes(exported, max_batch=2, opt_batch=4)


def test_a_file_that_is_not_onnx_is_refused_before_tensorrt_is_needed(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(qcompiler.InvalidFile, match="is not an ONNX model"):
        qcompiler.build_engine(bad, tmp_path / "x.engine")
    with pytest.raises(qcompiler.InvalidFile, match="no such file"):
        qcompiler.build_engine(tmp_path / "missing.onnx", tmp_path / "x.engine")


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-dependency path cannot be taken")
def test_without_tensorrt_building_names_the_install(exported, tmp_path):
    with pytest.raises(qcompiler.MissingDependency, match=r"pip install 'qcompiler\[tensorrt\]'"):
        qcompiler.build_engine(exported, tmp_path / "m.engine")
    run = subprocess.run([sys.executable, "-m", "qcompiler.api.cli", "build-engine", str(exported), "--out",
                          str(tmp_path / "m.engine")], capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].startswith("qcompile build-engine: error: building or running a "
                                                        "TensorRT engine needs TensorRT"), run.stderr


def test_an_explicit_tensorrt_target_that_cannot_run_says_why():
    model = nn.Sequential(nn.Linear(16, 16)).eval()
    fast = torch.compile(model, backend="qcompile", options={"target": "tensorrt"})
    why = "TensorRT is not installed" if not HAS_TRT else "run on CUDA tensors"
    with pytest.raises(qcompiler.TargetUnavailable, match=f"target 'tensorrt' cannot run here: {why}"):
        fast(torch.randn(2, 16))


@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need a CUDA device")
def test_a_built_engine_matches_the_reference_target(exported, tmp_path):
    engine_path = qcompiler.build_engine(exported, tmp_path / "m.engine", timing_cache=tmp_path / "t.cache")
    engine = tensorrt_engine.Engine.from_file(engine_path)
    from qcompiler.runtimes.ort_session import OrtSession
    import onnx

    x = torch.randn(3, 40, 32)
    want = OrtSession(onnx.load(str(exported)))(x)[0]
    got = engine(x.cuda())[0].float().cpu()
    assert torch.allclose(got, want, atol=5e-2, rtol=5e-2) and (tmp_path / "t.cache").stat().st_size > 0
