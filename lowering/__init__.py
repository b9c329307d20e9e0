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

from qcompiler.lowering import inductor, reference


def _ort_build(gm, example_inputs):
    from qcompiler.lowering import ort  # onnx / onnxruntime are optional: import on use

    return ort.build(gm, example_inputs)


def _triton_build(gm, example_inputs, cuda_graphs: bool = False):
    from qcompiler.lowering import triton  # triton is optional (the 'gpu' extra): import on use

    return triton.build(gm, example_inputs, cuda_graphs=cuda_graphs)


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _ort_supports(example_inputs) -> bool:
    # measured (and ONNX Runtime's CPU kernels fast) for float32 models only
    floats = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return _installed("onnx", "onnxruntime", "onnxscript") and all(x.dtype == torch.float32 for x in floats)


@dataclass(frozen=True)
class Lowering:
    name: str
    build: Callable            # (gm, example_inputs, **options) -> callable(*args)
    description: str
    # whether target="auto" may pick it for these graph inputs (dependencies installed, dtypes)
    supports: Callable[[list], bool] = lambda example_inputs: True
    # whether build() takes cuda_graphs=True (Inductor's CUDA graph trees around the compiled graph)
    cuda_graphs: bool = False


LOWERINGS = {
    "reference": Lowering("reference", reference.build, "q-ops run their plain-torch reference kernels"),
    "inductor": Lowering("inductor", inductor.build,
                         "the q-op graph, q-ops inlined as torch code, compiled by Inductor", cuda_graphs=True),
    "ort": Lowering("ort", _ort_build,
                    "the q-op graph exported to ONNX (ORT form) and run by an ONNX Runtime session",
                    _ort_supports),
    "triton": Lowering("triton", _triton_build,
                       "q-ops run as qcompile's Triton kernels (CUDA; the CPU only under TRITON_INTERPRET=1), "
                       "the rest of the graph through Inductor", lambda example_inputs: _installed("triton"),
                       cuda_graphs=True),
}
# What target="auto" means on each device type: the first target of the list that supports the
# graph (``Lowering.supports``), the list ordered by measurement. CPU: 'ort' was faster than
# 'inductor' on every row of benchmarks/cpu_speed.py (README, "ONNX"); 'cuda' stays on Inductor
# until benchmarks/gpu_e2e.py has measured the triton target faster.
AUTO = {"cpu": ("ort", "inductor"), "cuda": ("inductor",)}


def auto_target(device_type: str, example_inputs=()) -> str:
    """The target ``target="auto"`` picks for a graph on ``device_type`` (``reference`` on devices
    not listed)."""
    return next((t for t in AUTO.get(device_type, ()) if LOWERINGS[t].supports(list(example_inputs))), "reference")


def get_lowering(name: str) -> Lowering:
    try:
        return LOWERINGS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; valid targets: {sorted(LOWERINGS) + ['auto']}") from None
