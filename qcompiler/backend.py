"""The ``qcompile`` Dynamo backend: options -> recipe and target; passes; lowering.

``torch.compile(model, backend="qcompile", options={...})`` calls ``qcompile_backend`` once per
graph Dynamo captures (several with graph breaks, again on recompiles for new shapes). The
backend copies the graph, runs ``match -> smooth -> quantize``, and hands the q-op graph to the
chosen lowering. The returned ``CompiledGraph`` keeps the original graph so that a later
``qcompiler.calibrate`` makes it rebuild with the new statistics on its next call.
"""
from __future__ import annotations

import copy
import dataclasses
import weakref
from typing import Mapping, Optional

import torch
from torch import fx

from qcompiler import calibration, recipes
from qcompiler.lowering import auto_target, get_lowering
from qcompiler.passes.match import match
from qcompiler.passes.quantize import quantize
from qcompiler.passes.smooth import smooth

BACKEND_OPTIONS = ("recipe", "target", "cuda_graphs")
# every CompiledGraph alive, so explain() can find the decisions for a model's parameters
LIVE_GRAPHS: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()


def split_options(options: Optional[Mapping]) -> tuple:
    """options -> (Recipe, target name); unknown keys are an error listing the valid ones."""
    options = dict(options or {})
    target = options.pop("target", "auto")
    options.pop("cuda_graphs", None)  # a lowering option: qcompile_backend reads it
    fields = {f.name for f in dataclasses.fields(recipes.Recipe)} - {"name", "description"}
    unknown = sorted(set(options) - fields - {"recipe"})
    if unknown:
        raise ValueError(f"unknown qcompile option(s) {unknown}; valid options: "
                         f"{sorted(BACKEND_OPTIONS)} and the recipe fields {sorted(fields)}")
    return recipes.resolve(options), target


def _device_type(example_inputs) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


def _copy_dynamo_graph(original: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of Dynamo's graph that keeps what AOTAutograd reads to recognise a Dynamo graph.

    ``copy.deepcopy`` drops ``_param_name_to_source`` and each placeholder's ``_dynamo_source``;
    without them AOTAutograd does not know which inputs are parameters or static addresses
    (a ``StaticCache``'s tensors), and Inductor's CUDA graphs refuse the graph ("skipping
    cudagraphs due to mutated inputs", seen on the H100 with torch 2.11). The buffers our passes
    add (quantized weights, scales) get a constant source of their own name, so they count as
    static too.
    """
    gm = copy.deepcopy(original)
    sources = getattr(original, "_param_name_to_source", None)
    if sources is None:
        return gm
    old = [n for n in original.graph.nodes if n.op == "placeholder"]
    new = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for a, b in zip(old, new):
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source
    gm._param_name_to_source = dict(sources)
    return gm


def _register_new_sources(gm: fx.GraphModule) -> None:
    """Give every parameter or buffer the passes added a source, as Dynamo gives its own."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        sources.setdefault(name, ConstantSource(f"qcompile_{name}"))


def _lowering_options(lowering, cuda_graphs, device_type: str) -> dict:
    """The options a lowering's build() takes, checked: ``cuda_graphs`` needs CUDA and a target that
    compiles through Inductor."""
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"option cuda_graphs must be True or False, got {cuda_graphs!r}")
    if not cuda_graphs:
        return {}
    if device_type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model and inputs on a CUDA device (they are on {device_type!r}); "
                         "move them with .to('cuda') or drop the option")
    if not lowering.cuda_graphs:
        from qcompiler.lowering import LOWERINGS

        able = sorted(name for name, low in LOWERINGS.items() if low.cuda_graphs)
        raise ValueError(f"cuda_graphs=True: target {lowering.name!r} cannot run in CUDA graphs; use one of {able}")
    return {"cuda_graphs": True}


class CompiledGraph:
    """One Dynamo graph, quantized and lowered; rebuilt when calibration statistics change."""

    def __init__(self, gm: fx.GraphModule, example_inputs, recipe, target: str, cuda_graphs: bool = False):
        self.original = gm
        self.example_inputs = list(example_inputs)
        self.recipe = recipe
        self.target = auto_target(_device_type(example_inputs), example_inputs) if target == "auto" else target
        lowering = get_lowering(self.target)  # unknown target: fail now, with the list of valid ones
        self.lowering_options = _lowering_options(lowering, cuda_graphs, _device_type(example_inputs))
        self._build()
        LIVE_GRAPHS.add(self)

    def _build(self):
        self.generation = calibration.generation()
        gm = _copy_dynamo_graph(self.original)
        matches = match(gm, self.example_inputs, self.recipe)
        # the statistics this build used: only a change to these makes a rebuild worthwhile
        self.stats_used = [(m.param, calibration.stats_for(m.param)) for _, m, _ in matches]
        plans = smooth(gm, self.example_inputs, matches)
        self.decisions = quantize(gm, matches, plans)
        _register_new_sources(gm)
        self.graph_module = gm
        self.fn = get_lowering(self.target).build(gm, self.example_inputs, **self.lowering_options)

    def _stale(self) -> bool:
        if self.generation == calibration.generation():
            return False
        self.generation = calibration.generation()
        return any(calibration.stats_for(p) is not used for p, used in self.stats_used)

    def __call__(self, *args):
        if self._stale():
            self._build()
        with torch.no_grad():  # an inference compiler: q-ops have no gradients
            return self.fn(*args)


def qcompile_backend(gm: fx.GraphModule, example_inputs, options: Optional[Mapping] = None, mode=None):
    """The Dynamo backend registered as ``qcompile`` (entry point ``torch_dynamo_backends``).

    Args:
        gm: the FX graph Dynamo captured (parameters arrive as inputs).
        example_inputs: the graph's inputs; parameters among them are the model's own.
        options: ``{"recipe": name, "target": "auto" | "reference" | "inductor" | "ort" | "triton",
            "cuda_graphs": bool, <recipe field>: value}``
            e.g. ``{"recipe": "w8a8-smoothquant", "alpha": 0.8, "skip": ["lm_head"]}``.
            ``cuda_graphs=True`` (CUDA, targets inductor and triton) replays each compiled graph as
            a CUDA graph, as torch.compile's mode="reduce-overhead" does for Inductor: what decode
            with small batches needs, where kernel launches cost more than the kernels.
        mode: not used; torch.compile's ``mode`` is for Inductor's own backend.

    Example:
        >>> fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16"})
    """
    if mode not in (None, "default"):
        raise ValueError(f"backend 'qcompile' takes no mode (got {mode!r}); pass options={{'target': ...}}")
    recipe, target = split_options(options)
    return CompiledGraph(gm, example_inputs, recipe, target, (options or {}).get("cuda_graphs", False))
