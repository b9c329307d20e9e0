"""Shared test helpers: error measured against float64, NaN never passes."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's CPU interpreter; Triton reads this when a kernel
# is defined, i.e. before qcompiler.runtimes.triton_* is imported by any test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; fails outright on NaN/Inf in either."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    assert torch.isfinite(ref).all(), "reference has NaN/Inf"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


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
