"""Whether the Triton kernels can run here, and the errors that say why not.

The kernels run on a CUDA device, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``,
numerically faithful but slow: the CI tests every kernel that way on small shapes). Triton reads
that variable when a kernel is defined, so it must be set before ``qcompiler.runtimes.triton_*``
is first imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch


class TritonUnavailable(RuntimeError):
    """The ``triton`` target or a Triton kernel was asked for where it cannot run."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def require(device: torch.device) -> None:
    """Raise ``TritonUnavailable`` naming the fix unless a kernel can run on ``device``."""
    if not installed():
        raise TritonUnavailable("target 'triton' needs the triton package: pip install 'qcompiler[gpu]' "
                                "(or pick target='inductor' / 'ort')")
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return
    raise TritonUnavailable(
        f"target 'triton' runs on a CUDA device; these tensors are on {device.type!r}. Move the model "
        f"to 'cuda', pick target='inductor' or 'ort' for the CPU, or set TRITON_INTERPRET=1 before "
        f"importing qcompiler to run the kernels in Triton's (slow) CPU interpreter")


def available(device: torch.device) -> bool:
    try:
        require(device)
    except TritonUnavailable:
        return False
    return True
