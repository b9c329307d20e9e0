"""Lowerings: a q-op graph -> a callable that runs it on a target.

``LOWERINGS`` is the table a new target is added to: name -> ``Lowering`` (how to build the
callable, and whether it can run here). A lowering never re-derives a scale: it receives the
graph with every quantized weight and scale already computed as graph constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qcompiler.lowering import inductor, reference


def _ort_build(gm, example_inputs):
    from qcompiler.lowering import ort  # onnx / onnxruntime are optional: import on use

    return ort.build(gm, example_inputs)


def _triton_build(gm, example_inputs):
    from qcompiler.lowering import triton  # triton is optional (the 'gpu' extra): import on use

    return triton.build(gm, example_inputs)


@dataclass(frozen=True)
class Lowering:
    name: str
    build: Callable            # (gm, example_inputs) -> callable(*args)
    description: str


LOWERINGS = {
    "reference": Lowering("reference", reference.build, "q-ops run their plain-torch reference kernels"),
    "inductor": Lowering("inductor", inductor.build,
                         "the q-op graph, q-ops inlined as torch code, compiled by Inductor"),
    "ort": Lowering("ort", _ort_build,
                    "the q-op graph exported to ONNX (ORT form) and run by an ONNX Runtime session"),
    "triton": Lowering("triton", _triton_build,
                       "q-ops run as qcompile's Triton kernels (CUDA; the CPU only under TRITON_INTERPRET=1), "
                       "the rest of the graph through Inductor"),
}
# What target="auto" means on each device type, chosen by measurement (benchmarks/cpu_latency.py;
# 'cuda' stays on Inductor until benchmarks/gpu_e2e.py has measured the triton target faster).
AUTO = {"cpu": "inductor", "cuda": "inductor"}


def get_lowering(name: str) -> Lowering:
    try:
        return LOWERINGS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; valid targets: {sorted(LOWERINGS) + ['auto']}") from None
