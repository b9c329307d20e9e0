"""Every use of a private PyTorch API, in one place, each saying what it is for.

Underscored names change between torch releases without notice, and qcompile needs some of them:
to find the ``torch.compile`` call a backend call serves and the module Dynamo is tracing, to keep
the sources AOTAutograd reads on a copied Dynamo graph, to compile later under Dynamo's tracing
context, to run fake tensors through a graph, to hand graphs to Inductor, and a few ATen kernels
(tinygemm, ``_int_mm``, ``_scaled_mm``). Nothing else in the package touches a private torch name.
``tests/unit/test_torch_compat.py`` checks each entry on the installed torch (2.13 on the CPU,
2.11 on the GPU machine) and fails naming the entry when a release changes it.
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
from torch import fx, nn

# ----------------------------------------------------------------------------- torch.compile calls


def calling_compile(skip: int = 2) -> Optional[object]:
    """The ``torch.compile`` call a backend call serves (its ``_TorchCompileWrapper``), or None.

    Dynamo hands a backend a graph, not the compiled object; the wrapper that ``torch.compile`` made
    calls the backend as ``self.compiler_fn(...)``, so it is in a calling frame (``skip`` frames
    above this one is where to start looking)."""
    frame = sys._getframe(skip)
    for _ in range(8):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch._TorchCompileWrapper):
            return owner
        frame = frame.f_back
    return None


def compile_of(compiled) -> Optional[object]:
    """The ``_TorchCompileWrapper`` behind what ``torch.compile`` returned (a module or a function),
    or None: it sits a few attributes deep in Dynamo's callback chain."""
    roots = [getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)]
    roots += [c.cell_contents for c in (getattr(compiled, "__closure__", None) or ()) if _has_cell(c)]
    seen, todo = set(), [(r, 0) for r in roots if r is not None]
    while todo:
        obj, depth = todo.pop()
        if isinstance(obj, torch._TorchCompileWrapper):
            return obj
        if id(obj) in seen or depth > 5 or not hasattr(obj, "__dict__") or isinstance(obj, (nn.Module, type)):
            continue
        seen.add(id(obj))
        todo += [(v, depth + 1) for k, v in vars(obj).items() if not k.startswith("__") or k == "__wrapped__"]
    return None


def _has_cell(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


def compile_settings(wrapper) -> tuple:
    """(backend name, the ``options`` dict it was given) of a ``_TorchCompileWrapper``."""
    return getattr(wrapper, "compiler_name", None), dict(getattr(wrapper, "kwargs", {}).get("options") or {})


# ----------------------------------------------------------------------------- Dynamo's tracing state


def tracing_context():
    """Dynamo's tracing context (fake tensors, symbolic sizes, shape environment), or None."""
    return torch._guards.TracingContext.try_get()


def tracing(context):
    """A context manager that compiles under ``context`` (from ``tracing_context``)."""
    return torch._guards.tracing(context)


# what Dynamo's float-tensorifying pass raises to restart its analysis (torch >= 2.6), else ()
DYNAMO_RESTART = getattr(torch._dynamo.exc, "TensorifyScalarRestartAnalysis", ())


def forget_restart() -> None:
    """Drop the floats Dynamo noted to specialize for a restart that will not come."""
    state = getattr(torch._dynamo.symbolic_convert, "TensorifyState", None)
    if state is not None:
        state.clear()


def _float_symbol(node: fx.Node) -> Optional[str]:
    """The name of the symbolic float a placeholder's 0-d tensor holds (Dynamo lifted a Python float
    to it under ``dynamic=True``), or None."""
    memo = getattr(node.meta.get("example_value"), "item_memo", None)
    return getattr(getattr(getattr(memo, "node", None), "_expr", None), "name", None)


def _module_attribute(node: fx.Node) -> bool:
    """Whether a graph input comes from an attribute of an ``nn.Module`` (not from a call argument)."""
    return any("NNModuleSource" in type(s).__name__ for s in source_chain(node))


def constant_module_floats(gm: fx.GraphModule) -> None:
    """Have Dynamo trace the frame again with the Python floats of its modules (a norm's ``eps``,
    an attention's scaling) as constants it guards by value, where ``dynamic=True`` lifted them to
    graph inputs that the graph reads only with ``.item()``: Dynamo's own restart, the one Inductor
    asks for when it cannot keep a float as a tensor. Such a float then costs no tensor and no
    check at each call, and a lowering that must take it as a constant (an ONNX export) is right
    by construction. Returns when there is nothing to ask (no such float, a torch without the
    restart, or one asked for already). The request stays noted as Inductor's do (a frame traced
    again later, or Inductor's own pass on this graph, finds it; Dynamo forgets it on reset)."""
    state = getattr(torch._dynamo.symbolic_convert, "TensorifyState", None)
    if state is None or not DYNAMO_RESTART or tracing_context() is None:
        return
    names = [_float_symbol(n) for n in gm.graph.nodes if n.op == "placeholder" and n.users
             and all(u.op == "call_method" and u.target == "item" for u in n.users) and _module_attribute(n)]
    new = [name for name in names if name and not state.should_specialize(name)]
    if not new:
        return
    for name in new:
        state.specialize(name)
    raise DYNAMO_RESTART()


def traced_frame_scopes() -> Optional[tuple]:
    """(globals with the source roots, the source roots) of the frame Dynamo is tracing, for
    ``source_value``; None outside a Dynamo trace."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        names = {"L": tx.f_locals, "G": tx.f_globals}  # what a source's name refers to
        return dict(tx.f_globals, **names), names
    except Exception:  # not inside a Dynamo trace, or a torch without these internals
        return None


def source_chain(node: fx.Node) -> list:
    """The Dynamo sources of a graph input, outermost (the frame's local) last."""
    source, chain = getattr(node, "_dynamo_source", None), []
    while source is not None:
        chain.append(source)
        source = getattr(source, "base", None)
    return chain


def source_value(source, scopes: tuple):
    """What a Dynamo source refers to in the traced frame (``scopes`` from ``traced_frame_scopes``)."""
    return source.get_value(*scopes, {})


def copy_dynamo_sources(original: fx.GraphModule, copy: fx.GraphModule) -> None:
    """Give a deep copy of a Dynamo graph what ``copy.deepcopy`` drops and AOTAutograd reads to know
    which inputs are parameters or static addresses: ``_param_name_to_source`` and each
    placeholder's ``_dynamo_source``."""
    sources = getattr(original, "_param_name_to_source", None)
    if sources is None:
        return
    old = [n for n in original.graph.nodes if n.op == "placeholder"]
    new = [n for n in copy.graph.nodes if n.op == "placeholder"]
    for a, b in zip(old, new):
        if hasattr(a, "_dynamo_source"):
            b._dynamo_source = a._dynamo_source
    copy._param_name_to_source = dict(sources)


def register_constant_sources(gm: fx.GraphModule) -> None:
    """Give every parameter or buffer of a Dynamo graph that has no source a constant one, as Dynamo
    gives its own: the constants the passes and lowerings add (quantized weights, scales)."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    from torch._dynamo.source import ConstantSource

    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        sources.setdefault(name, ConstantSource(f"qcompile_{name}"))


@functools.lru_cache(maxsize=None)
def passing_dynamo(cls: type) -> type:
    """``cls``, also a Dynamo ``ShortenTraceback``: Dynamo re-raises those as they are instead of
    wrapping them in ``BackendCompilerFailed``, and cuts its own frames from the traceback. Without
    that class (another torch) ``cls`` itself. One class per error class."""
    shorten = getattr(torch._dynamo.exc, "ShortenTraceback", None)
    if shorten is None:
        return cls
    # str() is the original message: Dynamo appends its "report a bug to PyTorch" footer to args
    return type(cls.__name__, (shorten, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                               "__doc__": cls.__doc__, "__str__": lambda self: self.message})


def through_dynamo(e: Exception, frame) -> Exception:
    """A copy of ``e`` that passes through Dynamo unwrapped, its traceback starting at ``frame``."""
    cls = passing_dynamo(type(e))
    err = cls.__new__(cls, *e.args)
    err.args = e.args
    err.message = str(e)
    err.first_useful_frame = frame
    return err


# ----------------------------------------------------------------------------- fake tensors


def is_fake(x) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return isinstance(x, torch.Tensor) and _is_fake(x)


def fake_values(gm: fx.GraphModule, example_inputs) -> dict:
    """node -> its fake value (shapes and dtypes; sizes symbolic where Dynamo made them so), from
    Dynamo's own fake tensors of the graph inputs where it left them; {} when the graph cannot be
    propagated. The graph's constants (quantized weights) stay real tensors."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dynamo_vals = [n.meta.get("example_value") for n in placeholders]
    mode = detect_fake_mode([v for v in dynamo_vals if isinstance(v, torch.Tensor)] or example_inputs)
    mode = mode or FakeTensorMode()
    inputs = [v if isinstance(v, torch.Tensor) and detect_fake_mode([v]) is mode
              else (mode.from_tensor(x) if isinstance(x, torch.Tensor) else (v if v is not None else x))
              for v, x in zip(dynamo_vals, example_inputs)]
    vals = {}
    prop = FakeTensorProp(gm, mode)
    run_node = prop.run_node

    def recorded(n):
        vals[n] = run_node(n)
        return vals[n]
    prop.run_node = recorded
    allowed = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        with mode:
            prop.propagate_dont_convert_inputs(*inputs)
    except Exception:
        return {}
    finally:
        mode.allow_non_fake_inputs = allowed
    return vals


# ----------------------------------------------------------------------------- Inductor


def compile_fx(gm: fx.GraphModule, example_inputs, config_patches: dict):
    """Inductor's compiler entry, as the "inductor" backend calls it."""
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches)


def cacheable_functions_patch(functions: dict) -> dict:
    """Inductor's config marking Python functions (qualified name -> a key of their code) as safe for
    its and AOTAutograd's on-disk caches; {} on a torch without that setting."""
    from torch._inductor import config

    if not hasattr(config, "unsafe_marked_cacheable_functions"):
        return {}
    return {"unsafe_marked_cacheable_functions": functions}


# ----------------------------------------------------------------------------- ATen kernels and ops

def op_schema(op):
    """An operator overload's schema (``OpOverload._schema``): its arguments' names and types."""
    return op._schema


# the function torch.nn.functional.linear is (what Dynamo may record in a graph)
C_LINEAR = torch._C._nn.linear


def check(condition, message) -> None:
    """``torch._check``: a size fact symbolic shapes learn (``message`` a callable)."""
    torch._check(condition, message)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """INT8 x INT8 -> INT32 GEMM (CUDA; M > 16, K and N multiples of 8)."""
    return torch._int_mm(a, b)


def scaled_mm(a, b, *, scale_a, scale_b, bias, out_dtype):
    """cuBLASLt's FP8 GEMM with row / column scales."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype)


def convert_weight_to_int4pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """tinygemm's INT4 weight layout from uint8 ``[N, K / 2]`` codes (CUDA)."""
    return torch.ops.aten._convert_weight_to_int4pack(codes, inner_k_tiles)


def weight_int4pack_mm(x: torch.Tensor, weight: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    """tinygemm: bf16 activations times its packed INT4 weight."""
    return torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scales_and_zeros)
