"""The ``tensorrt`` lowering: the q-op graph exported in the TensorRT form, built into a TensorRT
engine once and run with torch CUDA tensors.

The graph is frozen and exported as for the ``ort`` target, but in the TensorRT form (Q/DQ
explicit quantization, checked by ``qcompiler.deploy.onnx_check``'s rules at export). Its engine
is built once per exported file, optimization profile, GPU and TensorRT version and kept on disk
(``runtimes.tensorrt_engine.engine_cache_dir``): a later process compiling the same quantized
graph loads the engine instead of building it. The profile covers the dynamic dimensions from 1
to ``max_batch`` / ``max_seq`` (the graph's example sizes are the optimum).

An explicit ``target="tensorrt"`` is a contract: without TensorRT or a CUDA device, or when the
graph cannot be exported, it is an error naming why; ``target="auto"`` never picks it until it is
measured faster than the GPU targets qcompile has.
"""
from __future__ import annotations

import torch
from torch import fx

from qcompiler.errors import TargetUnavailable
from qcompiler.lowering.onnx import (fed_inputs, freeze, isolated, layout_outputs, output_layout, root_message,
                                     symbolic_shapes, to_onnx)
from qcompiler.runtimes import tensorrt_engine

MAX_BATCH, MAX_SEQ = 64, 4096


class TensorRTGraph:
    """Runs a graph's TensorRT engine: torch tensors in, torch tensors out."""

    running_target = "tensorrt"
    fallback_reason = None

    def __init__(self, engine, inputs: list, layout: list):
        self.engine, self.inputs, self.layout = engine, inputs, layout

    def __call__(self, *args):
        feeds = [args[i] for i in self.inputs]
        return layout_outputs(self.layout, self.engine(*feeds), feeds)


def _profile(model, feeds) -> dict:
    """Each input's example shape is the optimum; dynamic dimensions range from 1 to the maxima."""
    names = tensorrt_engine.input_names(model)
    static = tensorrt_engine.profile_shapes(model, max_batch=MAX_BATCH, max_seq=MAX_SEQ)
    out = {}
    for name, x in zip(names, feeds):
        lo, _, hi = static[name]
        opt = tuple(x.shape)
        hi = tuple(max(h, o) for h, o in zip(hi, opt))
        out[name] = (lo, opt, hi)
    return out


def build(gm: fx.GraphModule, example_inputs, strict: bool = True):
    """The graph's engine runner (the backend has checked ``can_run`` for this target)."""
    example_inputs = list(example_inputs)
    fed = fed_inputs(gm, example_inputs)
    shapes = symbolic_shapes(gm, fed)
    frozen, feeds, fed = freeze(gm, example_inputs)
    layout = output_layout(frozen)
    try:
        model = isolated(lambda: to_onnx(frozen, feeds, "tensorrt", dynamic=shapes is not None, dynamic_shapes=shapes))
    except Exception as exc:
        raise TargetUnavailable(f"target 'tensorrt' cannot run this graph: the ONNX export failed "
                                f"({root_message(exc)}); use target='inductor' or 'triton'") from exc
    device = next((x.device for x in feeds if isinstance(x, torch.Tensor)), torch.device("cuda"))
    engine = tensorrt_engine.cached_engine(model.SerializeToString(), _profile(model, feeds), device)
    return TensorRTGraph(engine, fed, layout)
