"""Lowerings: a q-op graph -> a callable that runs it on a target.

``LOWERINGS`` is the table a new target is added to: name -> ``Lowering`` (how to build the
callable, and whether it can run here). A lowering never re-derives a scale: it receives the
graph with every quantized weight and scale already computed as graph constants.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from qcompiler.errors import OptionError, TargetUnavailable  # noqa: F401  (TargetUnavailable re-exported)
from qcompiler.lowering import inductor, reference
from qcompiler.lowering.devices import input_device
from qcompiler.runtimes import tensorrt_engine  # imports no TensorRT until an engine is built
from qcompiler.runtimes.triton_support import TritonUnavailable, require


def _ort_build(gm, example_inputs, strict: bool = False):
    from qcompiler.lowering import ort  # onnx / onnxruntime are optional: import on use

    return ort.build(gm, example_inputs, strict=strict)


def _triton_build(gm, example_inputs, strict: bool = False, cuda_graphs: bool = False):
    from qcompiler.lowering import triton  # triton is optional (the 'gpu' extra): import on use

    return triton.build(gm, example_inputs, cuda_graphs=cuda_graphs, strict=strict)


def _tensorrt_build(gm, example_inputs, strict: bool = False):
    from qcompiler.lowering import tensorrt  # TensorRT is optional (the 'tensorrt' extra): import on use

    return tensorrt.build(gm, example_inputs)


def _any_target(build):
    """A build() that has no fallback of its own, so ``strict`` changes nothing."""
    return lambda gm, example_inputs, strict=False, **options: build(gm, example_inputs, **options)


def _missing(*modules: str) -> list:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _always(example_inputs) -> tuple:
    return True, ""


def _ort_can_run(example_inputs) -> tuple:
    missing = _missing("onnx", "onnxruntime", "onnxscript")
    if missing:
        return False, f"{', '.join(missing)} not installed: pip install onnx onnxruntime onnxscript (qcompiler's own dependencies)"
    if input_device(example_inputs).type != "cpu":
        return False, (f"the model is on {input_device(example_inputs).type!r}; qcompile's ONNX Runtime sessions run "
                       "on the CPU: move the model to the CPU, or pick target='inductor' / 'triton'")
    return True, ""


def _ort_preferred(example_inputs) -> tuple:
    # measured (and ONNX Runtime's CPU kernels fast) for float32 models only; a 0-d tensor is a
    # Python float Dynamo lifted to an input under dynamic=True (float64, exported as a constant)
    floats = {x.dtype for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() > 0}
    if floats - {torch.float32}:
        return False, f"'ort' is measured on float32 models; this graph has {sorted(map(str, floats))}"
    return _ort_can_run(example_inputs)


def _tensorrt_can_run(example_inputs) -> tuple:
    return tensorrt_engine.can_run(input_device(example_inputs))


def _triton_can_run(example_inputs) -> tuple:
    try:
        require(input_device(example_inputs))
    except TritonUnavailable as exc:
        return False, str(exc)
    return True, ""


@dataclass(frozen=True)
class Lowering:
    """One target: how to build a graph's callable, and whether (and why not) it can run here."""

    name: str
    build: Callable            # (gm, example_inputs, strict=False, **options) -> callable(*args)
    description: str
    # (ok, reason): whether the target can run these graph inputs at all (dependencies, device)
    can_run: Callable[[list], tuple] = _always
    # (ok, reason): whether target="auto" should pick it for these inputs (measured faster)
    preferred: Callable[[list], tuple] = None
    # whether build() takes cuda_graphs=True (Inductor's CUDA graph trees around the compiled graph)
    cuda_graphs: bool = False
    # whether build() takes the floats Dynamo lifts to graph inputs (``dynamic=True``: a float
    # argument of the call) as the constants they were (an ONNX export must): others build again
    freezes_scalars: bool = False

    def check(self, example_inputs) -> None:
        """Raise ``TargetUnavailable`` naming the reason and the fix when the target cannot run."""
        ok, reason = self.can_run(list(example_inputs))
        if not ok:
            raise TargetUnavailable(f"target {self.name!r} cannot run here: {reason}")


LOWERINGS = {
    "reference": Lowering("reference", _any_target(reference.build),
                          "q-ops run their plain-torch reference kernels"),
    "inductor": Lowering("inductor", _any_target(inductor.build),
                         "the q-op graph, q-ops inlined as torch code, compiled by Inductor", cuda_graphs=True),
    "ort": Lowering("ort", _ort_build,
                    "the q-op graph exported to ONNX (ORT form) and run by an ONNX Runtime session",
                    _ort_can_run, _ort_preferred, freezes_scalars=True),
    "triton": Lowering("triton", _triton_build,
                       "q-ops run as qcompile's Triton kernels (CUDA; the CPU only under TRITON_INTERPRET=1), "
                       "the rest of the graph through Inductor", _triton_can_run, cuda_graphs=True),
    "tensorrt": Lowering("tensorrt", _tensorrt_build,
                         "the q-op graph exported to ONNX (TensorRT form) and built into a TensorRT engine, "
                         "cached on disk", _tensorrt_can_run, freezes_scalars=True),
}
# What target="auto" means on each device type: the first target of the list that is preferred
# for the graph (``Lowering.preferred``, else ``can_run``), the list ordered by measurement. CPU:
# 'ort' was faster than 'inductor' on every row of benchmarks/cpu_speed.py. CUDA: 'triton', which
# measures its kernels against the float linears of the graph's shapes when it builds and gives
# way to Inductor where they are not faster (lowering/triton.py).
AUTO = {"cpu": ("ort", "inductor"), "cuda": ("triton", "inductor")}


def auto_choice(device_type: str, example_inputs=()) -> tuple:
    """``(target, reason)``: what ``target="auto"`` picks for a graph on ``device_type``, and why
    each target listed before it was passed over (``reference`` on devices not listed)."""
    passed = []
    for name in AUTO.get(device_type, ()):
        low = LOWERINGS[name]
        ok, reason = (low.preferred or low.can_run)(list(example_inputs))
        if ok:
            return name, "; ".join(passed)
        passed.append(f"{name}: {reason}")
    return "reference", "; ".join(passed) or f"no compiled target is listed for {device_type!r} devices"


def auto_target(device_type: str, example_inputs=()) -> str:
    """The target ``target="auto"`` picks for a graph on ``device_type``."""
    return auto_choice(device_type, example_inputs)[0]


def get_lowering(name: str) -> Lowering:
    try:
        return LOWERINGS[name]
    except KeyError:
        raise OptionError(f"unknown target {name!r}; valid targets: {sorted(LOWERINGS) + ['auto']}") from None
