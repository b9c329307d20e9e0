"""The ONNX lowering: a q-op graph -> an ``onnx.ModelProto`` in the TensorRT or ORT form.

The q-op graph (weights already quantized by the passes) goes through the ``torch.onnx``
exporter, with each q-op translated by ``lowering.onnx_ops`` (one function per q-op and form).
Before export, model parameters become stored constants (the ORT form may keep its large float ones
as inputs: ``shared_parameters``) and Dynamo's symbolic-size inputs are rewritten as ``sym_size`` of
the tensors they measure, so the ONNX graph's only inputs are the model's own tensors, with their
batch and sequence dimensions left dynamic.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import threading
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
from torch import fx, nn

from qcompiler.errors import OptionError
from qcompiler.ir.ops import REFERENCE
from qcompiler.lowering import onnx_fusions, onnx_translate
from qcompiler.lowering.onnx_ops import FORMS, OPSET, OPSETS, TRANSLATIONS, UnsupportedForm
from qcompiler.lowering.scalars import freeze_scalars, item_only

log = logging.getLogger(__name__)

__all__ = ["to_onnx", "FORMS", "OPSET", "OPSETS", "UnsupportedForm", "runtime_inputs", "shared_parameters"]


def _symbol(value) -> Optional[str]:
    """The symbol of a dynamic size; None for a static one, including a SymInt that Dynamo's
    shape environment has pinned to a number (a feature size the weights fix)."""
    if not isinstance(value, torch.SymInt) or value.node.maybe_as_int() is not None:
        return None
    return str(value.node.expr)


def runtime_inputs(gm: fx.GraphModule, example_inputs) -> list:
    """Indices of the placeholders a caller must feed: tensors that are not model parameters."""
    return [i for i, v in enumerate(example_inputs) if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)]


def fed_inputs(gm: fx.GraphModule, example_inputs) -> list:
    """Indices of the inputs an exported graph takes: ``runtime_inputs`` less the 0-d tensors
    Dynamo lifts from a module's float attributes (eps, dropout p) and reads with ``.item()``;
    they are constants of the model, and export cannot take a data-dependent value."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i in runtime_inputs(gm, example_inputs) if not item_only(placeholders[i], example_inputs[i])]


SHARED_PARAMETER_BYTES = 2**20


def shared_parameters(gm: fx.GraphModule, example_inputs, min_bytes: int = SHARED_PARAMETER_BYTES) -> list:
    """Indices of the floating-point parameters of at least ``min_bytes`` that the graph reads as
    they are: an embedding table, a float ``lm_head``, a linear the recipe skipped (quantized weights
    are the passes' own constants, never parameters).

    An ONNX Runtime session can take them as inputs bound to the model's own memory at every call
    (``freeze``'s ``shared``) instead of constants of its file: as constants each session holds a
    copy of each, and two of a tied table that an ``lm_head`` reads transposed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [i for i, (node, v) in enumerate(zip(placeholders, example_inputs))
            if isinstance(v, nn.Parameter) and v.is_floating_point() and node.users
            and v.numel() * v.element_size() >= min_bytes]


def unmeasured_ints(gm: fx.GraphModule, example_inputs) -> dict:
    """Placeholder index -> value of each dynamic integer input that no fed tensor's size measures
    (under ``dynamic=True``, an int argument such as transformers' ``logits_to_keep``): an export
    can take it only as a constant (``freeze``'s ``pinned``)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    measured = {_symbol(size) for i in fed_inputs(gm, example_inputs)
                for size in getattr(placeholders[i].meta.get("example_value"), "shape", ())}
    return {i: _hint(value) for i, (node, value) in enumerate(zip(placeholders, example_inputs))
            if isinstance(value, (int, torch.SymInt)) and node.users
            and _symbol(node.meta.get("example_value")) not in measured | {None}}


def _static_int(value) -> Optional[int]:
    """The value of an integer Dynamo specialized (an int, or a SymInt pinned to a number); None
    for a dynamic one or anything else."""
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _hint(value) -> int:
    """An integer input's value: a SymInt's example value (no guard added), or the int."""
    return value.node.hint if isinstance(value, torch.SymInt) else int(value)


def freeze(gm: fx.GraphModule, example_inputs, pinned: Optional[dict] = None, shared: Sequence[int] = ()) -> tuple:
    """Copy of ``gm`` whose parameters are constants and whose SymInt inputs are ``sym_size`` calls.

    ``pinned`` (placeholder index -> int, from ``unmeasured_ints``) gives the integer inputs that
    become constants; any other integer input no tensor measures is an ``UnsupportedForm``.
    ``shared`` (from ``shared_parameters``) gives the parameters that stay inputs.
    Returns (graph module, example runtime inputs, their indices among ``example_inputs``).
    """
    pinned = pinned or {}
    # a new module over a copy of the graph: the weights are shared, not copied (a deep copy of the
    # module would hold a second copy of every quantized weight while the export runs)
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    keep = set(fed_inputs(gm, example_inputs)) | set(shared)
    freeze_scalars(gm, {i: example_inputs[i].item() for i in set(runtime_inputs(gm, example_inputs)) - keep})
    sizes = {}  # symbol -> (placeholder, dim) measuring it
    for i in sorted(keep):
        fake = placeholders[i].meta.get("example_value")
        for d, size in enumerate(getattr(fake, "shape", ())):
            sym = _symbol(size)
            if sym is not None:
                sizes.setdefault(sym, (placeholders[i], d))
    first = next((placeholders[i] for i in sorted(keep)), None)
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if i in keep:
            continue
        if isinstance(value, torch.Tensor) and not node.users:  # a weight the passes replaced: not hashed, not kept
            gm.graph.erase_node(node)
            continue
        if isinstance(value, torch.Tensor):
            name = f"_frozen_{i}"
            gm.register_buffer(name, value.detach())
            with gm.graph.inserting_after(first or node):
                const = gm.graph.get_attr(name)
        elif not node.users:  # a size Dynamo passes along that this graph never reads
            gm.graph.erase_node(node)
            continue
        elif i in pinned or _static_int(node.meta.get("example_value")) is not None:  # a constant of this graph
            node.replace_all_uses_with(pinned[i] if i in pinned else _static_int(node.meta.get("example_value")))
            gm.graph.erase_node(node)
            continue
        else:
            sym = _symbol(node.meta.get("example_value"))
            if sym not in sizes:
                raise UnsupportedForm(f"graph input {node.name} ({value!r}) is not a tensor size the "
                                      f"export can recompute; export with static shapes")
            src, dim = sizes[sym]
            with gm.graph.inserting_after(src):
                const = gm.graph.call_function(torch.ops.aten.sym_size.int, (src, dim))
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm, [example_inputs[i] for i in sorted(keep)], sorted(keep)


def symbolic_shapes(gm: fx.GraphModule, indices: Sequence[int]):
    """``dynamic_shapes`` for the placeholders at ``indices``: the dimensions Dynamo made symbolic
    are dynamic, the rest static; None when all are static."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims, specs = {}, []
    for i in indices:
        fake = placeholders[i].meta.get("example_value")
        spec = {}
        for d, size in enumerate(getattr(fake, "shape", ())):
            sym = _symbol(size)
            if sym is not None:
                # AUTO rather than one named Dim per symbol: export re-derives the equalities
                # and bounds (a named Dim with a guard such as "<= 512" is a hard error)
                spec[d] = dims.setdefault(sym, torch.export.Dim.AUTO)
        specs.append(spec)
    return tuple(specs) if dims else None


def auto_dims(x) -> Optional[dict]:
    """Default dynamic dimensions of one input: all of a token-id tensor's, all but the last
    (the feature size) of a float tensor's; AUTO lets torch.export pin any the model fixes."""
    if not isinstance(x, torch.Tensor):
        return None
    dims = range(x.dim() - 1) if x.is_floating_point() else range(x.dim())
    return {d: torch.export.Dim.AUTO for d in dims}


def _dynamic_shapes(inputs: Sequence[torch.Tensor]):
    return tuple(auto_dims(x) for x in inputs)


def _takes_varargs(module: nn.Module) -> bool:
    import inspect

    params = inspect.signature(module.forward).parameters.values()
    return any(p.kind == p.VAR_POSITIONAL for p in params)


# q-ops with no ONNX translation of their own: exported as their plain-torch reference, which the
# exporter turns into standard ONNX ops (a KV cache's dequantize-and-concatenate, then attention)
INLINED = {op: REFERENCE[op] for op in (torch.ops.qcompile.kv_dequantize.default,
                                        torch.ops.qcompile.attention_quantized_kv.default)}


def _inline(module: nn.Module) -> nn.Module:
    """``module``, or a copy of it whose ``INLINED`` q-ops are calls of their references."""
    if not isinstance(module, fx.GraphModule) or not any(n.target in INLINED for n in module.graph.nodes):
        return module
    module = copy.deepcopy(module)
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target in INLINED:
            node.target = INLINED[node.target]
    module.recompile()
    return module


def to_onnx(module: nn.Module, inputs: Sequence, form: str = "tensorrt", *, kwargs: Optional[dict] = None,
            input_names: Optional[Sequence[str]] = None, dynamic: bool = True, dynamic_shapes=None,
            host: bool = False):
    """Export ``module`` (a q-op graph, or any module holding q-ops) to an ``onnx.ModelProto``;
    ``host``: for a session on this machine (``onnx_fusions.HOST_FUSIONS``), not a portable file.
    ``export_ir`` with the same arguments gives the graph before serialization."""
    return proto_of(export_ir(module, inputs, form, kwargs=kwargs, input_names=input_names, dynamic=dynamic,
                              dynamic_shapes=dynamic_shapes, host=host))


def proto_of(model):
    """The ``onnx.ModelProto`` of ``model`` (an ``ir.Model``), every weight copied into it."""
    from onnxscript import ir

    return ir.serde.serialize_model(model)


def export_ir(module: nn.Module, inputs: Sequence, form: str = "tensorrt", *, kwargs: Optional[dict] = None,
              input_names: Optional[Sequence[str]] = None, dynamic: bool = True, dynamic_shapes=None,
              host: bool = False):
    """``to_onnx``'s graph as onnxscript's ``ir.Model``, optimized and its tied weights stored once.
    Its weights are the exporter's tensors: ``save_ir`` writes them to a file without first
    copying every one into a ``ModelProto``."""
    if form not in FORMS:
        raise OptionError(f"unknown ONNX form {form!r}; valid forms: {list(FORMS)}")
    module = _inline(module)
    if dynamic_shapes is None and dynamic and not kwargs:
        dynamic_shapes = _dynamic_shapes(inputs)
    if dynamic_shapes is not None and _takes_varargs(module):  # Dynamo's graphs: forward(self, *args)
        dynamic_shapes = (tuple(dynamic_shapes),)
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            model = _export(module, inputs, form, kwargs, input_names, dynamic_shapes)
        except Exception as exc:  # the exporter wraps our translation errors: surface the message
            cause = exc
            while cause is not None and not isinstance(cause, UnsupportedForm):
                cause = cause.__cause__
            if cause is not None:
                raise UnsupportedForm(str(cause)) from None
            raise
    onnx_fusions.optimize(model, form, host=host)
    return share_tied(model)


def _export(module: nn.Module, inputs: Sequence, form: str, kwargs, input_names, dynamic_shapes):
    """The exporter's ``ir.Model`` of ``module``: traced once (``onnx_translate``); a module
    ``torch.export`` refuses as the exporter first calls it goes through ``torch.onnx.export``,
    whose further capture strategies may take it."""
    names = list(input_names) if input_names else None
    try:
        program = onnx_translate.capture(module, inputs, kwargs, dynamic_shapes)
    except Exception as exc:
        log.info("torch.export refused the graph (%s); torch.onnx.export's own capture runs", root_message(exc))
        return torch.onnx.export(
            module, tuple(inputs), kwargs=kwargs, dynamo=True, opset_version=OPSETS[form],
            custom_translation_table=TRANSLATIONS[form], dynamic_shapes=dynamic_shapes, input_names=names,
            optimize=False, verbose=False, report=False).model
    return onnx_translate.export_program(program, opset=OPSETS[form], table=TRANSLATIONS[form], input_names=names)


def save_ir(model, path: str, data: str) -> None:
    """Write ``model`` (an ``ir.Model``) to ``path`` with its weights in ``data``, a file name
    beside it, one tensor at a time; ``model`` is left as it was."""
    from onnxscript import ir

    ir.save(model, path, external_data=data)


# initializers smaller than this are not worth a hash (biases, scales, shape constants)
_TIED_MIN_ELEMENTS = 4096
_HASH_CHUNK_BYTES = 2**22  # a transposed table is hashed this many bytes of rows at a time


def _fingerprint(array: np.ndarray) -> tuple:
    """dtype, shape and a hash of ``array``'s values in row-major order, reading a contiguous
    array in place and copying any other a few rows at a time."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    if array.flags.c_contiguous:
        digest.update(memoryview(array.reshape(-1).view(np.uint8)))
    else:
        step = max(1, _HASH_CHUNK_BYTES // max(1, array[0].nbytes)) if array.ndim and len(array) else 1
        for start in range(0, len(array), step):
            digest.update(np.ascontiguousarray(array[start:start + step]).reshape(-1).view(np.uint8))
    return array.dtype.str, array.shape, digest.digest()


def share_tied(model):
    """Store a tied weight once in ``model`` (an ``ir.Model``, changed in place and returned): an
    initializer equal to an earlier one is dropped (its readers read the earlier one), and one
    equal to an earlier one's transpose becomes a ``Transpose`` of it (a language model's input
    embedding ``[V, D]`` and its tied output projection, which the translations and the exporter's
    folding store as ``[D, V]``; the INT8 table of a quantized embedding alike). A weight that is
    itself a graph input or output keeps its own copy."""
    from onnxscript import ir

    graph = model.graph
    seen = {}
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if (tensor is None or len(tensor.shape) != 2 or tensor.size < _TIED_MIN_ELEMENTS
                or tensor.dtype in (ir.DataType.BFLOAT16, ir.DataType.INT4, ir.DataType.UINT4)):
            continue
        array = tensor.numpy()
        key = _fingerprint(array)
        if key in seen and not value.is_graph_output() and not value.is_graph_input():
            earlier, transposed = seen[key]
            replacement = earlier
            if transposed:
                node = ir.node("Transpose", [earlier], attributes={"perm": [1, 0]}, name=f"tied_{name}")
                if len(graph):
                    graph.insert_before(graph.node(0), node)
                else:
                    graph.append(node)
                replacement = node.outputs[0]
                # a rewrite's initializer may carry its type on its tensor only
                replacement.dtype, replacement.shape = tensor.dtype, ir.Shape(tensor.shape)
            value.replace_all_uses_with(replacement)
            graph.initializers.pop(name)
            if transposed:
                replacement.name = name
            continue
        seen.setdefault(key, (value, False))
        seen.setdefault(_fingerprint(array.T), (value, True))
    return model


def _rename_inputs(nodes, renames: dict) -> None:
    """Rename node inputs, in ``If`` / ``Loop`` / ``Scan`` bodies too (they read outer names)."""
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _rename_inputs(sub.node, renames)


PROTOBUF_LIMIT = 2**31  # the largest ONNX file without external data


def with_io_dtype(model, dtype: torch.dtype):
    """A float32 graph whose float inputs and outputs become ``dtype`` (float16 / bfloat16), with a
    ``Cast`` beside each: a half-precision model's interface, its math in float32 (the runtime, e.g.
    TensorRT's precision flags, chooses what it computes in)."""
    from onnx import TensorProto, helper

    to = {torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}[dtype]
    graph = model.graph
    casts, renames = [], {}
    for value in graph.input:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{value.name}_float32"
            renames[value.name] = inner
            casts.append(helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT,
                                          name=f"cast_{inner}"))
            value.type.tensor_type.elem_type = to
    _rename_inputs(graph.node, renames)
    tail = []
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{value.name}_float32"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == value.name:
                        node.output[i] = inner
            _rename_inputs(graph.node, {value.name: inner})
            tail.append(helper.make_node("Cast", [inner], [value.name], to=to, name=f"cast_{value.name}"))
            value.type.tensor_type.elem_type = to
    nodes = casts + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return model


class _FromRuntime:
    """An output layout's entry: the runtime's next output."""

    def __repr__(self):
        return "FROM_RUNTIME"


FROM_RUNTIME = _FromRuntime()


@dataclasses.dataclass(frozen=True)
class SizeOf:
    """An output layout's entry: a size of the ``feed``-th runtime input (a graph returning a
    length it measures, as a sliding-window cache's), read from that input at each call."""
    feed: int
    dim: int

    def __call__(self, feeds) -> int:
        return feeds[self.feed].shape[self.dim]


def output_layout(gm: fx.GraphModule) -> list:
    """Per output of a frozen graph: ``FROM_RUNTIME`` where the exported model returns it, a
    ``SizeOf`` where it is a size of an input, else the constant the graph returns there (None;
    an int ``freeze`` pinned). Sizes and constants are taken out of ``gm``'s outputs (None there
    instead): ONNX returns tensors only, and the exporter writes a size it knows as a constant."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    feeds = [n for n in gm.graph.nodes if n.op == "placeholder"]
    layout = []
    for v in values:
        if isinstance(v, fx.Node) and v.target == torch.ops.aten.sym_size.int and v.args[0] in feeds:
            layout.append(SizeOf(feeds.index(v.args[0]), v.args[1]))
        elif isinstance(v, fx.Node):
            constant = _constant(v)
            layout.append(FROM_RUNTIME if constant is _NOT_CONSTANT else constant)
        else:
            layout.append(v)
    if isinstance(out.args[0], (tuple, list)) and any(slot is not FROM_RUNTIME and slot is not None for slot in layout):
        out.args = (type(out.args[0])(v if slot is FROM_RUNTIME else None for v, slot in zip(values, layout)),)
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return layout


_NOT_CONSTANT = FROM_RUNTIME


def _constant(node: fx.Node):
    """The int a graph computes from constants alone (``add(5, 1)`` after ``freeze`` pinned an
    input to 5), else ``_NOT_CONSTANT``."""
    if node.op != "call_function" or node.kwargs or isinstance(node.meta.get("example_value"), torch.Tensor):
        return _NOT_CONSTANT
    args = [_constant(a) if isinstance(a, fx.Node) else a for a in node.args]
    if any(a is _NOT_CONSTANT or not isinstance(a, (int, float, bool)) for a in args):
        return _NOT_CONSTANT
    value = node.target(*args)
    return value if isinstance(value, (int, float, bool)) else _NOT_CONSTANT


def layout_outputs(layout: list, outputs, feeds) -> tuple:
    """The graph's outputs from the runtime's ``outputs`` and its ``feeds`` by ``layout``."""
    outs = iter(outputs)
    return tuple(next(outs) if slot is FROM_RUNTIME else slot(feeds) if isinstance(slot, SizeOf) else slot
                 for slot in layout)


def root_message(exc: BaseException) -> str:
    while exc.__cause__ is not None:  # the exporter wraps the error that says what went wrong
        exc = exc.__cause__
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def isolated(fn):
    """Run ``fn`` in a fresh thread: the exporter traces with Dynamo, whose tracing state is per
    thread, so exporting from inside the backend call leaves the outer compile's guards alone."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc
    worker = threading.Thread(target=target, name="qcompile-onnx-export")
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
