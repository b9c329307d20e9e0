"""The ``ort`` lowering: the q-op graph, exported in the ORT form, run by an ONNX Runtime session.

The graph is frozen and exported once (``lowering.onnx``). A graph Dynamo captured with
symbolic sizes exports with dynamic batch and sequence dimensions, and its session is cached:
a later capture of the same model with the same inputs (a new shape Dynamo recompiles for)
reuses it without exporting again. A graph the exporter cannot take runs through Inductor
instead, with a warning that says why.
"""
from __future__ import annotations

import re
import warnings
import weakref

import torch
from torch import fx, nn

from qcompiler.lowering import inductor
from qcompiler.lowering.onnx import fed_inputs, freeze, runtime_inputs, symbolic_shapes, to_onnx
from qcompiler.runtimes.ort_session import OrtSession

# structural key -> (weakrefs to the parameters, session)
_SESSIONS: dict = {}
LAST_FALLBACK = {"reason": None}


def _key(gm: fx.GraphModule, example_inputs) -> tuple:
    params = [v for v in example_inputs if isinstance(v, nn.Parameter)]
    inputs = [(v.dim(), v.dtype) for i, v in enumerate(example_inputs) if i in set(runtime_inputs(gm, example_inputs))]
    n_out = len(_output_layout(gm))
    # the q-op constants tie the key to this quantization (other recipe, other constants)
    consts = tuple(sorted((re.sub(r"_\d+$", "", n.target), tuple(getattr(gm, n.target).shape))
                          for n in gm.graph.nodes if n.op == "get_attr" and hasattr(gm, n.target)))
    return tuple(id(p) for p in params), tuple(inputs), n_out, consts, params


def _output_layout(gm: fx.GraphModule) -> list:
    """For each graph output: True when it is a tensor the ONNX model returns, else its constant value."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return [isinstance(v, fx.Node) for v in values]


class OrtGraph:
    """Runs a graph's ONNX session; the export happens on the first call, outside Dynamo's
    compilation (exporting while Dynamo builds its guards corrupts them)."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm, self.example_inputs = gm, list(example_inputs)
        self.layout = _output_layout(gm)
        self.session, self.inputs, self.fallback = None, None, None

    def _build(self):
        gm, example_inputs = self.gm, self.example_inputs
        ids, inputs, n_out, consts, params = _key(gm, example_inputs)
        shapes = symbolic_shapes(gm, fed_inputs(gm, example_inputs))
        # a session serves graphs whose dynamic dimensions are the ones it was exported with
        dynamic_dims = None if shapes is None else tuple(tuple(sorted(s or {})) for s in shapes)
        key = (ids, inputs, n_out, consts, dynamic_dims)
        cached = _SESSIONS.get(key)
        if cached is not None and all(r() is p for r, p in zip(cached[0], params)):
            self.session, self.inputs = cached[1], fed_inputs(gm, example_inputs)
            return
        try:
            frozen, feeds, fed = freeze(gm, example_inputs)
            self.session = OrtSession(to_onnx(frozen, feeds, "ort", dynamic=shapes is not None,
                                              dynamic_shapes=shapes))
            self.inputs = fed
        except Exception as exc:  # never an error: the graph still runs, through Inductor
            root = exc
            while root.__cause__ is not None:  # the exporter wraps the error that says what went wrong
                root = root.__cause__
            LAST_FALLBACK["reason"] = f"{type(root).__name__}: {str(root).strip().splitlines()[0][:300]}"
            warnings.warn(f"qcompile target 'ort' could not export this graph ({LAST_FALLBACK['reason']}); "
                          f"it runs through Inductor instead", stacklevel=3)
            self.fallback = inductor.build(gm, example_inputs)
            return
        if shapes is not None:
            _SESSIONS[key] = ([weakref.ref(p) for p in params], self.session)
            if params:  # the session holds the weights: drop it with the model
                weakref.finalize(params[0], _SESSIONS.pop, key, None)
        self.example_inputs = None  # the parameters stay alive through the model, not through us

    def __call__(self, *args):
        if self.session is None and self.fallback is None:
            self._build()
        if self.fallback is not None:
            return self.fallback(*args)
        outs = iter(self.session(*(args[i] for i in self.inputs)))
        return tuple(next(outs) if is_tensor else None for is_tensor in self.layout)


def build(gm: fx.GraphModule, example_inputs):
    return OrtGraph(gm, example_inputs)
