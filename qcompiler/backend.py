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

BACKEND_OPTIONS = ("recipe", "target")
# every CompiledGraph alive, so explain() can find the decisions for a model's parameters
LIVE_GRAPHS: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()


def split_options(options: Optional[Mapping]) -> tuple:
    """options -> (Recipe, target name); unknown keys are an error listing the valid ones."""
    options = dict(options or {})
    target = options.pop("target", "auto")
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


class CompiledGraph:
    """One Dynamo graph, quantized and lowered; rebuilt when calibration statistics change."""

    def __init__(self, gm: fx.GraphModule, example_inputs, recipe, target: str):
        self.original = gm
        self.example_inputs = list(example_inputs)
        self.recipe = recipe
        self.target = auto_target(_device_type(example_inputs), example_inputs) if target == "auto" else target
        get_lowering(self.target)  # unknown target: fail now, with the list of valid ones
        self._build()
        LIVE_GRAPHS.add(self)

    def _build(self):
        self.generation = calibration.generation()
        gm = copy.deepcopy(self.original)
        matches = match(gm, self.example_inputs, self.recipe)
        # the statistics this build used: only a change to these makes a rebuild worthwhile
        self.stats_used = [(m.param, calibration.stats_for(m.param)) for _, m, _ in matches]
        plans = smooth(gm, self.example_inputs, matches)
        self.decisions = quantize(gm, matches, plans)
        self.graph_module = gm
        self.fn = get_lowering(self.target).build(gm, self.example_inputs)

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
        options: ``{"recipe": name, "target": "auto" | "reference" | "inductor", <recipe field>: value}``
            e.g. ``{"recipe": "w8a8-smoothquant", "alpha": 0.8, "skip": ["lm_head"]}``.
        mode: not used; torch.compile's ``mode`` is for Inductor's own backend.

    Example:
        >>> fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a16"})
    """
    if mode not in (None, "default"):
        raise ValueError(f"backend 'qcompile' takes no mode (got {mode!r}); pass options={{'target': ...}}")
    recipe, target = split_options(options)
    return CompiledGraph(gm, example_inputs, recipe, target)
