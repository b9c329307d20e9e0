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
import inspect
import operator
import time
import warnings
import weakref
from typing import Mapping, Optional

import torch
from torch import Tensor, fx, nn

from qcompiler import torch_compat
from qcompiler.api.options import split_options
from qcompiler.calibration import state
from qcompiler.errors import CalibrationError, OptionError, QcompileError
from qcompiler.lowering import auto_choice, get_lowering
from qcompiler.lowering.devices import input_device
from qcompiler.lowering.scalars import freeze_scalars, item_only
from qcompiler.passes.pipeline import run_passes
from qcompiler.runtimes.host_memory import FilePages, return_freed_memory

# the attribute of a weight Parameter that lists (weakly) the compiled graphs using it
GRAPHS = "_qcompile_graphs"


def _copy_dynamo_graph(original: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of Dynamo's graph that keeps what AOTAutograd reads to recognise a Dynamo graph.

    Without the sources ``copy.deepcopy`` drops, AOTAutograd does not know which inputs are
    parameters or static addresses (a ``StaticCache``'s tensors), and Inductor's CUDA graphs refuse
    the graph ("skipping cudagraphs due to mutated inputs", seen on the H100 with torch 2.11). The
    buffers our passes add (quantized weights, scales) get a constant source of their own name, so
    they count as static too.
    """
    gm = copy.deepcopy(original)
    torch_compat.copy_dynamo_sources(original, gm)
    return gm


def _lowering_options(lowering, cuda_graphs, device_type: str) -> dict:
    """The options a lowering's build() takes, checked: ``cuda_graphs`` needs CUDA and a target that
    compiles through Inductor."""
    if not isinstance(cuda_graphs, bool):
        raise OptionError(f"option cuda_graphs must be True or False, got {cuda_graphs!r}")
    if not cuda_graphs:
        return {}
    if device_type != "cuda":
        raise OptionError(f"cuda_graphs=True needs the model and inputs on a CUDA device (they are on {device_type!r}); "
                         "move them with .to('cuda') or drop the option")
    if not lowering.cuda_graphs:
        from qcompiler.lowering import LOWERINGS

        able = sorted(name for name, low in LOWERINGS.items() if low.cuda_graphs)
        raise OptionError(f"cuda_graphs=True: target {lowering.name!r} cannot run in CUDA graphs; use one of {able}")
    return {"cuda_graphs": True}


_VERSION = operator.attrgetter("_version")


def _picker(slots: list):
    """``args -> tuple(args[i] for i in slots)``, one C call (``operator.itemgetter``)."""
    if len(slots) > 1:
        return operator.itemgetter(*slots)
    return lambda args: tuple(args[i] for i in slots)


class _Watch:
    """What a build read from the quantization state, to tell cheaply when a rebuild is due."""

    def __init__(self, params):
        self.used = [(p, state.stats_for(p), state.prepared_for(p)) for p in params]
        linked = [state.linked_state(p)[0] for p in params]
        self.states = {id(s): (s, s.generation) for s in linked if s is not None}
        # calibrating links every linear of the model at once: one unlinked weight tells
        self.unlinked = [p for p, s in zip(params, linked) if s is None][:1]

    def stale(self) -> bool:
        moved = any(s.generation != g for s, g in self.states.values()) or \
            any(state.linked_state(p)[0] is not None for p in self.unlinked)
        if not moved:
            return False
        fresh = _Watch([p for p, _, _ in self.used])
        changed = any(state.stats_for(p) is not st or state.prepared_for(p) is not pr for p, st, pr in self.used)
        self.__dict__.update(fresh.__dict__)
        return changed


def compiled_graphs(model) -> list:
    """The ``CompiledGraph``s of one compile of ``model``, oldest first: of that compile when
    ``model`` is what ``torch.compile`` returned, else of the model's most recent compile."""
    found = {}
    for p in state.unwrap(model).parameters():
        for ref in p.__dict__.get(GRAPHS, ()):
            graph = ref()
            if graph is not None:
                found[id(graph)] = graph
    graphs = sorted(found.values(), key=lambda g: g.created)
    key = torch_compat.compile_of(model)
    if key is None and graphs:
        key = graphs[-1].compile_key  # a plain module: its latest compile
    return [g for g in graphs if g.compile_key is key]


class CompiledGraph:
    """One Dynamo graph, quantized and lowered; rebuilt when calibration statistics change.

    ``requested`` is the target the options named, ``target`` the one chosen for it (``auto``
    resolved, ``auto_reason`` saying what it passed over), ``running_target`` the one whose code
    runs and ``fallback_reason`` why, when the chosen one fell back (``target="auto"`` only: an
    explicit target that cannot run is an error).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs, recipe, target: str, cuda_graphs: bool = False,
                 compile_key=None, frozen_scalars: Optional[dict] = None, mode_modules=None):
        self.original = gm
        # the modules whose ``training`` flags decide a call's graph (``__call__``): the linear
        # layers of the compiled module whose weights this graph reads (else the module itself),
        # found in Dynamo's frame while it traces; a variant made later gets its first graph's
        if mode_modules is None:
            mode_modules = _mode_modules(compiled_module(gm), example_inputs)
        self.mode_modules = mode_modules
        self.float_calls = 0
        self.sizes = None  # set when a rebuild at call time had to take the sizes of that call
        self.frozen_scalars = frozen_scalars or {}
        self.example_inputs = list(example_inputs)
        self.recipe = recipe
        self.requested = target
        self.target, self.auto_reason = (auto_choice(input_device(example_inputs).type, example_inputs)
                                         if target == "auto" else (target, ""))
        lowering = get_lowering(self.target)  # unknown target: fail now, with the list of valid ones
        if target != "auto":
            lowering.check(example_inputs)   # an explicit target is a contract: raise with the reason
        self.lowering_options = _lowering_options(lowering, cuda_graphs, input_device(example_inputs).type)
        self.cuda_graphs = cuda_graphs
        self.compile_key = compile_key
        self.created = time.monotonic_ns()
        # Dynamo may call one graph for several module instances of the same class (a graph break
        # inside a repeated layer): parameters are graph inputs, but the quantized weights were
        # made from these. Another instance's parameters get a graph of their own (``_variant``).
        self.param_slots = [i for i, v in enumerate(self.example_inputs) if isinstance(v, nn.Parameter)]
        self._params_of = _picker(self.param_slots)  # a call reads every parameter twice: at C speed
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.scalar_slots = [i for i, (n, v) in enumerate(zip(placeholders, self.example_inputs)) if item_only(n, v)]
        self._scalars_of = _picker(self.scalar_slots)
        self.variants = {}
        # Dynamo's tracing context (its fake tensors, symbolic sizes and shape environment): a
        # variant compiled later, outside Dynamo, compiles under it, so its sizes stay as dynamic as
        # this graph's and a float Dynamo lifted to a tensor (dynamic=True) can still be read
        self.tracing = torch_compat.tracing_context()
        self._build()

    @property
    def fallback_reason(self):
        return getattr(self.fn, "fallback_reason", None)

    @property
    def running_target(self) -> str:
        """The target whose code runs now (the one picked, or what it fell back to)."""
        return getattr(self.fn, "running_target", None) or self.target

    def _build(self):
        self._check_prepared_weights(self.example_inputs)
        gm = _copy_dynamo_graph(self.original)
        freeze_scalars(gm, self.frozen_scalars)
        # a weight mapped from a checkpoint file that its quantized copy replaced gives its pages
        # back at once: the float model is never resident whole beside the quantized one
        pages = FilePages()
        rewritten = run_passes(gm, self.example_inputs, self.recipe, replaced=lambda p: pages.release([p]))
        return_freed_memory()  # the passes' weight-sized temporaries, before the lowering allocates
        pages.release(_replaced_parameters(gm, self.example_inputs))  # tables the embedding pass replaced
        params = rewritten.params
        self.watch = _Watch(params)
        # the graph's weights as quantized: an in-place change since (load_state_dict, an optimizer
        # step, a merged adapter) bumps a parameter's version counter, and the next call re-quantizes
        self.versions = self._versions(self.example_inputs)
        self.decisions = rewritten.decisions
        torch_compat.register_constant_sources(gm)
        self.graph_module = gm
        self.fn = get_lowering(self.target).build(gm, self.example_inputs, strict=self.requested != "auto",
                                                  **self.lowering_options)
        # the floats Dynamo lifted to inputs, as built, where what runs took them as constants (an
        # ONNX export must): a call that brings other values builds again (``__call__``)
        frozen = bool(self.frozen_scalars) or get_lowering(self.running_target).freezes_scalars
        self.scalar_values = self._scalar_values(self.example_inputs) if frozen else None
        # the lowering's temporaries; the passes' and the lowering's graphs are reference cycles that
        # hold weight-sized tensors until the collector runs, whose cost grows with the process's
        # objects: worth it for a real model's graph, not for each of many small ones
        return_freed_memory(collect=_weight_bytes(self.example_inputs) >= COLLECT_WEIGHT_BYTES)
        pages.release(_state_tensors(self.example_inputs))  # read by the passes and the lowering
        for p in params:  # explain(model) finds a model's compiled graphs through its weights
            graphs = p.__dict__.setdefault(GRAPHS, [])
            graphs[:] = [r for r in graphs if r() is not None] + [weakref.ref(self)]

    def _scalar_values(self, args) -> list:
        return [t.item() for t in self._scalars_of(args)] if self.scalar_slots else []

    def _same_scalars(self, args) -> bool:
        """Whether the lifted floats of ``args`` are those the graph was built with (NaN as NaN)."""
        values = self._scalar_values(args)
        return values == self.scalar_values or [float(v).hex() for v in values] == [
            float(v).hex() for v in self.scalar_values]

    def _same_params(self, args) -> bool:
        return all(map(operator.is_, self._params_of(args), self._params_of(self.example_inputs)))

    def _variant(self, args) -> "CompiledGraph":
        """This graph quantized and lowered for the parameters in ``args`` (made once per set).

        A variant is compiled outside Dynamo. It compiles under this graph's tracing context, so
        its sizes stay as dynamic as this graph's. Where that cannot work (the graph reads a float
        Dynamo lifted to a tensor, ``.item()`` of a 0-d input under ``dynamic=True``, such as a
        module's ``eps``; or the frame's shape environment holds such floats, which only Dynamo
        can specialize) the variant takes those values from ``args`` as constants and is compiled
        for the sizes of ``args``; a call with other values or other sizes gets a variant of its own.
        """
        scalars = {i: args[i].item() for i in self.scalar_slots}
        key = (tuple(id(args[i]) for i in self.param_slots), tuple(float(v).hex() for v in scalars.values()))
        graph = self.variants.get(key)
        if graph is None and not scalars and self.tracing is not None:
            slots = set(self.param_slots)
            example = [args[i] if i in slots else v for i, v in enumerate(self.example_inputs)]
            try:
                with torch_compat.tracing(self.tracing):
                    graph = CompiledGraph(self.original, example, self.recipe, self.requested, self.cuda_graphs,
                                          self.compile_key, mode_modules=self.mode_modules)
            except torch_compat.DYNAMO_RESTART:  # it also noted floats to specialize for a restart that will not come
                torch_compat.forget_restart()
                graph = None
            if graph is not None:
                self.variants[key] = graph
        if graph is None or not graph._same_params(args):  # ids are reused after a module is freed
            key = key + (tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args),)
            graph = self.variants.get(key)
            if graph is None or not graph._same_params(args):
                graph = CompiledGraph(self.original, list(args), self.recipe, self.requested, self.cuda_graphs,
                                      self.compile_key, frozen_scalars=scalars, mode_modules=self.mode_modules)
                self.variants[key] = graph
        return graph

    def _versions(self, args) -> tuple:
        return tuple(map(_VERSION, self._params_of(args)))

    def _check_prepared_weights(self, args) -> None:
        """A weight AWQ / GPTQ prepared codes for, changed since (in place, or a saved state
        loaded into another model's weights), cannot be re-quantized without calibration data:
        an error naming the layers and the fix, never the old codes."""
        by_state = {}
        for i in self.param_slots:
            st, name = state.linked_state(args[i])
            if st is not None and name in st.prepared:
                by_state.setdefault(id(st), (st, []))[1].append(name)
        stale = [n for st, names in by_state.values() for n in st.changed_since_prepared(names)]
        if stale:
            raise CalibrationError(
                f"the weights of {', '.join(stale[:4])}{' and more' if len(stale) > 4 else ''} changed after "
                f"calibration prepared their quantized codes from them: run qcompiler.calibrate(model, batches, "
                f"recipe=...) again to prepare the new weights, or qcompiler.state_of(model).clear() to drop the "
                f"prepared codes and quantize the new weights by rounding")

    def _rebuild(self, args) -> None:
        """Quantize and lower again at call time (new statistics, new weights). A graph with static
        sizes is rebuilt as it was; one Dynamo made dynamic is rebuilt for the sizes of ``args``
        and again when a call brings others (compiling it under Dynamo's tracing context after
        Dynamo has installed its guards can specialize a size the guards do not check)."""
        self.example_inputs = list(args)
        # outside Dynamo a graph cannot read a float Dynamo lifted to a tensor (Inductor refuses the
        # data-dependent ``.item()``): the values of this call become constants, checked at each call
        self.frozen_scalars = {i: args[i].item() for i in self.scalar_slots}
        self._build()
        dynamic = any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and _symbolic(v))
                      for v in self._dynamo_values())
        self.sizes = _sizes(args) if dynamic else None

    def _dynamo_values(self) -> list:
        return [n.meta.get("example_value") for n in self.original.graph.nodes if n.op == "placeholder"]

    def _training(self) -> bool:
        return any(m.training for m in (ref() for ref in self.mode_modules) if m is not None)

    def _float_call(self, args):
        """Training mode with gradients enabled: the floating-point graph, so gradients flow."""
        if not self.float_calls:
            warnings.warn("qcompile runs this graph in floating point: the model is in training mode with gradients "
                          "enabled (gradients flow; nothing is quantized). Quantization applies in eval mode "
                          "(model.eval()) or under torch.no_grad(); explain() counts these calls", stacklevel=3)
        self.float_calls += 1
        return self.original(*args)

    def __call__(self, *args):
        if not self._same_params(args):
            return self._variant(args)(*args)
        if torch.is_grad_enabled() and self._training():
            return self._float_call(args)
        if self.sizes is not None and _sizes(args) != self.sizes:
            self._rebuild(args)
        if self.watch.stale():
            self._rebuild(args)
        if self._versions(args) != self.versions:  # re-quantize (``_build`` refuses prepared codes)
            self._rebuild(args)
        if self.scalar_values and not self._same_scalars(args):  # a float argument changed, say
            self._rebuild(args)
        with torch.no_grad():  # an inference compiler: q-ops have no gradients
            return self.fn(*args)


COLLECT_WEIGHT_BYTES = 64 * 2**20  # a graph reading this many bytes of parameters runs the collector after its build


def _weight_bytes(example_inputs) -> int:
    return sum(v.numel() * v.element_size() for v in example_inputs if isinstance(v, nn.Parameter))


def _replaced_parameters(gm: fx.GraphModule, example_inputs) -> list:
    """The parameters the rewritten graph no longer reads (the passes replaced them by quantized
    copies): the pages of those mapped from a checkpoint file can go (``FilePages.release``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [v for n, v in zip(placeholders, example_inputs) if isinstance(v, nn.Parameter) and not n.users]


def _state_tensors(example_inputs) -> list:
    """The quantization state's tensors of the graph's weights: calibration rows (the passes read a
    few hundred of each) and prepared codes (the lowering copies them). A state loaded from a file
    (``qcompiler.load``) maps them, and their pages can go once the graph is built
    (``FilePages.release``; the kernel reads them again if a later compile touches them)."""
    found = []
    for v in example_inputs:
        if not isinstance(v, nn.Parameter):
            continue
        stats, prepared = state.stats_for(v), state.prepared_for(v)
        if stats is not None:
            found.append(stats.rows)
        weight = getattr(prepared, "weight", None)
        if dataclasses.is_dataclass(weight):
            found += [t for t in (getattr(weight, f.name) for f in dataclasses.fields(weight)) if isinstance(t, Tensor)]
    return found


def _mode_modules(module: Optional[nn.Module], example_inputs) -> list:
    """Weak references to the linear layers of ``module`` whose weights are among the graph's
    inputs (a wrapper's own mode does not matter where its layers are in eval mode), else to
    ``module`` itself; [] when it is not known (a function compiled on its own)."""
    if module is None:
        return []
    params = {id(v) for v in example_inputs if isinstance(v, nn.Parameter)}
    layers = [m for _, m in state.linear_layers(module) if id(m.weight) in params]
    return [weakref.ref(m) for m in (layers or [module])]


def _symbolic(t: torch.Tensor) -> bool:
    return any(isinstance(d, torch.SymInt) for d in t.shape)


def _sizes(args) -> tuple:
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args)


def compiled_module(gm: fx.GraphModule) -> Optional[nn.Module]:
    """The module whose code Dynamo is compiling into ``gm`` (the outermost module on the path
    to any of its parameters, read from Dynamo's sources in the frame being traced), or None."""
    scopes = torch_compat.traced_frame_scopes()
    if scopes is None:
        return None
    for node in gm.graph.nodes:
        for src in reversed(torch_compat.source_chain(node)):  # the frame's local first
            try:
                value = torch_compat.source_value(src, scopes)
            except Exception:
                continue
            if isinstance(value, nn.Module):
                return value
    return None


def _attach_kv_cache(gm: fx.GraphModule, recipe) -> None:
    """Honour ``kv_cache=``: the compiled model's ``generate()`` gets a ``QuantizedKVCache``."""
    from qcompiler.api import kv_cache

    model = compiled_module(gm)
    if model is None or not hasattr(model, "config"):
        raise OptionError(
            f"kv_cache={recipe.kv_cache!r} applies to a transformers model compiled as a whole "
            f"(torch.compile(model.forward, ...) or torch.compile(model, ...)), and this graph's model "
            f"could not be found: pass cache=qcompiler.QuantizedKVCache(model.config, {recipe.kv_cache!r}) "
            f"to generate() instead")
    kv_cache.attach(model, recipe.kv_cache, recipe.kv_group_size, recipe.kv_residual)


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
    try:
        if mode not in (None, "default"):
            raise OptionError(f"backend 'qcompile' takes no mode (got {mode!r}); pass options={{'target': ...}}")
        recipe, target = split_options(options)
        torch_compat.constant_module_floats(gm)  # may restart Dynamo's trace of the frame
        if recipe.kv_cache is not None:
            _attach_kv_cache(gm, recipe)
        return CompiledGraph(gm, example_inputs, recipe, target, (options or {}).get("cuda_graphs", False),
                             compile_key=torch_compat.calling_compile())
    except QcompileError as e:  # the user's mistake: show it, not the compiler stack around it
        raise torch_compat.through_dynamo(e, inspect.currentframe()) from None
