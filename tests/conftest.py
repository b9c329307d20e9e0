"""Shared test helpers: error measured against float64, NaN never passes; caches of this run only."""
import atexit
import os
import random
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's CPU interpreter; Triton reads this when a kernel
# is defined, i.e. before qcompiler.runtimes.triton_* is imported by any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# compiled artifacts an earlier run left (exported ONNX files, kernel timings, TensorRT engines,
# Inductor's and Triton's caches) must not stand in for the compile a test means to check:
# this run keeps them in a folder of its own, which the environment hands to every subprocess
# and to pytest-xdist's workers (made once, by the first process; removed when that one exits).
# The converted models and tokenized text are data, not compiled code: linked from the lasting
# cache, and what this run converted is kept there for the next.
_ARTIFACTS = {"onnx", "kernels", "engines", "inductor", "triton"}
if "QCOMPILE_TEST_RUN_CACHE" not in os.environ:
    from qcompiler.bundled import zoo

    _lasting = zoo.cache_dir()
    _run = Path(tempfile.mkdtemp(prefix="qcompile-test-run-"))
    for _entry in _lasting.iterdir():
        if _entry.name not in _ARTIFACTS:
            (_run / _entry.name).symlink_to(_entry)
    os.environ.update(QCOMPILE_TEST_RUN_CACHE=str(_run), QCOMPILE_CACHE=str(_run),
                      TORCHINDUCTOR_CACHE_DIR=str(_run / "inductor"), TRITON_CACHE_DIR=str(_run / "triton"))

    def _keep_data_and_drop_the_run(run=_run, lasting=_lasting):
        for entry in run.iterdir():
            if entry.name not in _ARTIFACTS and not entry.is_symlink() and not (lasting / entry.name).exists():
                shutil.move(str(entry), str(lasting / entry.name))
        shutil.rmtree(run, ignore_errors=True)

    atexit.register(_keep_data_and_drop_the_run)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; fails outright on NaN/Inf in either."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    assert torch.isfinite(ref).all(), "reference has NaN/Inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test starts from a seed of its own name: a module built or an input drawn without a
    seed is the same whatever ran before it in this process (pytest-xdist's order varies)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _own_export_cache(tmp_path, monkeypatch):
    """Each test exports its ``ort`` graphs into a folder of its own: a file kept on disk by an earlier
    test or run would let a graph skip the export that the test counts or checks."""
    from qcompiler.lowering import ort

    folder = tmp_path / "qcompile-onnx-cache"
    monkeypatch.setattr(ort, "cache_folder", lambda kind: folder.mkdir(exist_ok=True) or folder)
