"""The ``ort`` lowering: the q-op graph, exported in the ORT form, run by an ONNX Runtime session.

The graph is frozen and exported once, when it is compiled. A graph Dynamo captured with symbolic
sizes exports with those dimensions dynamic (the feature sizes are the weights', so they are
static), and its session is cached by everything that shapes the exported file: the graph's code,
the inputs' dtypes and static sizes, the dynamic dimensions, the bytes of every constant (quantized
weights, scales) and the versions of onnx and ONNX Runtime. A later capture of the same quantized model (a new shape Dynamo recompiles
for) reuses it without exporting again; another recipe or other weights never do. The cache
holds nothing that cannot be rebuilt: dropping it costs an export. The exported file is also
kept on disk (``runtimes.disk_cache``, keyed as well by the exporter's code), so a later process
compiling the same quantized model (after ``qcompiler.load``, say) skips the export.

A graph the exporter cannot take is an error when the user asked for ``target="ort"``; under
``target="auto"`` it is compiled by Inductor instead, in the backend call, so it stays as
dynamic as Dynamo's graph, and ``fallback_reason`` says why.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
import weakref

import torch
from torch import fx, nn

from qcompiler.errors import TargetUnavailable
from qcompiler.lowering import inductor
from qcompiler.lowering.fallback import Chosen
from qcompiler.lowering.onnx import (PROTOBUF_LIMIT, export_ir, fed_inputs, freeze, isolated, layout_outputs,
                                     output_layout, proto_of, root_message, save_ir, shared_parameters,
                                     symbolic_shapes, unmeasured_ints)
from qcompiler.lowering.ort_kernels import kernel_counts
from qcompiler.runtimes.disk_cache import cache_folder, code_version, keep, source_files, touch
from qcompiler.runtimes.host_memory import return_freed_memory
from qcompiler.runtimes.ort_int8_probe import signed_weights_exact
from qcompiler.runtimes.ort_session import OrtSession

# content key -> session; entries leave with the model's parameters (safe to drop at any time)
_SESSIONS: dict = {}


class OrtExportError(TargetUnavailable):
    """``target="ort"`` was asked for and this graph cannot be exported to ONNX Runtime."""


def _feed_signature(feeds, shapes) -> list:
    """Each input's dtype and sizes, a dynamic dimension as None: a file exported with a static
    size takes that size only, so the size is part of its key."""
    specs = shapes if shapes is not None else [None] * len(feeds)
    return [(x.dtype, tuple(None if d in (spec or {}) else size for d, size in enumerate(x.shape)))
            for x, spec in zip(feeds, specs)]


def _versions() -> str:
    """The versions of the exporter's libraries and of the runtime that reads the file, and whether
    this CPU takes signed INT8 weights (``onnx_signed_weights``: the file differs)."""
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript

    return (f"onnx {onnx.__version__} onnxscript {onnxscript.__version__} onnx_ir {onnx_ir.__version__} "
            f"onnxruntime {onnxruntime.__version__} signed int8 weights {signed_weights_exact()[0]}")


def _content_key(frozen: fx.GraphModule, feeds, shapes) -> str:
    """A digest of everything that changes the exported file: the graph's code, every input's
    dtype and static sizes, which dimensions are dynamic, the constants' bytes, the versions."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(frozen.code.encode())
    digest.update(repr(_feed_signature(feeds, shapes)).encode())
    digest.update(_versions().encode())
    for name, value in sorted(frozen.state_dict(keep_vars=False).items()):
        digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode())
        digest.update(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy())  # read in place
    return digest.hexdigest()


def _session(gm: fx.GraphModule, example_inputs, pinned: dict):
    """(session, fed input indices, output layout) for ``gm``: the session from the cache, or
    exported now; the integer inputs ``pinned`` gives are constants of the file (``output_layout``
    says where the session's outputs go among the graph's)."""
    params = [v for v in example_inputs if isinstance(v, nn.Parameter)]
    shared = shared_parameters(gm, example_inputs)
    fed = sorted(set(fed_inputs(gm, example_inputs)) | set(shared))
    shapes = symbolic_shapes(gm, fed)
    frozen, feeds, fed = freeze(gm, example_inputs, pinned, shared)
    try:
        layout = output_layout(frozen)
        key = _content_key(frozen, feeds, shapes)
        if key in _SESSIONS:
            return _SESSIONS[key], fed, layout
        session = _exported(frozen, feeds, shapes, key, [k for k, i in enumerate(fed) if i in shared])
    finally:
        # the frozen copy is a reference cycle: without this its weights would wait for the collector
        frozen._buffers.clear()
    _SESSIONS[key] = session
    if params:  # the session holds the weights: drop it with the model
        weakref.finalize(params[0], _SESSIONS.pop, key, None)
    return session, fed, layout


DISK_CACHE_BYTES = 8 * 2**30  # the exported files kept on disk, least recently used dropped first


def exporter_files() -> list:
    """Every source file an exported file depends on: this module's and those of all the qcompiler
    modules it reads, the translations, the fusions and the q-op definitions among them."""
    return source_files(sys.modules[__name__])


def _exported(frozen: fx.GraphModule, feeds, shapes, key: str, shared: list) -> OrtSession:
    """A session of the graph's ORT form: its file from the disk cache, or exported and kept
    there. The file keeps its weights in a side file (``<name>.data``), which ONNX Runtime maps
    into memory instead of copying them out of a parsed ``ModelProto`` (less memory per session:
    docs/results/ort_decode_session.md), and files of any size can be kept. ``shared``: the
    positions of the inputs that are model parameters (``shared_parameters``)."""
    path = cache_folder("onnx") / f"{key}-{code_version(*exporter_files())[:16]}.onnx"
    data = path.with_name(path.name + ".data")
    if path.exists() and data.exists():
        try:
            session = OrtSession(str(path), parameters=shared)
            touch(path)
            touch(data)
            return session
        except Exception:  # noqa: BLE001 - a damaged or partial file is exported again
            pass
    model = isolated(lambda: export_ir(frozen, feeds, "ort", dynamic=shapes is not None, dynamic_shapes=shapes,
                                       host=True))
    saved = _saved(model, path, data)
    proto = None if saved else proto_of(model)  # the disk refused: the session takes the graph from memory
    del model
    return_freed_memory(collect=True)  # the export's graphs are reference cycles: only the collector frees them
    if saved:
        return OrtSession(str(path), parameters=shared)  # the session reads the file: no copy of the weights in this process
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        raise OSError(f"the ONNX file of this graph ({proto.ByteSize() / 2**30:.1f} GB) could not be written "
                      f"to {path.parent}, and ONNX Runtime takes a model this large from a file only: "
                      f"point $QCOMPILE_CACHE at a writable folder with room for it")
    return OrtSession(proto, parameters=shared)


def _saved(model, path, data) -> bool:
    """Write ``model`` (an ``ir.Model``) to ``path`` with its weights in ``data``, both whole or
    neither, even with processes racing; False where the disk refused (full, read-only)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.mkdir(exist_ok=True)
        save_ir(model, str(temp / path.name), data.name)
        (temp / data.name).touch()  # a graph without large constants writes no side file: an empty one
        os.replace(temp / data.name, data)  # the weights first: a file names its side file
        os.replace(temp / path.name, path)
        temp.rmdir()
        keep(path.parent, DISK_CACHE_BYTES)
        return True
    except OSError:
        shutil.rmtree(temp, ignore_errors=True)
        return False


class OrtGraph:
    """Runs a graph's ONNX Runtime session: torch tensors in, torch tensors out.

    An integer input no tensor size measures (``unmeasured_ints``) is a constant of the exported
    file: a call with another value gets a session of its own, exported then and kept. A graph
    without such inputs never exports again, so once its session holds the quantized weights the
    graph's own copies are released (``release_constants``): the process holds them once.
    """

    running_target = "ort"
    fallback_reason = None

    def __init__(self, gm: fx.GraphModule, example_inputs: list):
        pinned = unmeasured_ints(gm, example_inputs)
        self.gm, self.slots = gm, sorted(pinned)
        self.first = tuple(pinned.values())
        self.sessions = {self.first: _session(gm, example_inputs, pinned)}
        if not self.slots:
            release_constants(gm)

    @property
    def session(self) -> OrtSession:
        """The session of the values the graph was compiled with (tools replace it to profile it)."""
        return self.sessions[self.first][0]

    @session.setter
    def session(self, session: OrtSession) -> None:
        self.sessions[self.first] = (session, *self.sessions[self.first][1:])

    def kernel_lines(self) -> list:
        """Per session: how many GEMMs run each ONNX Runtime kernel (``explain`` prints them)."""
        lines = []
        for values, (session, _, _) in self.sessions.items():
            counts = kernel_counts(session.graph, getattr(session, "parameter_names", ()))
            pinned = f" (constants {dict(zip(self.slots, values))})" if self.slots else ""
            lines += [f"{n} x {kernel}{pinned}" for kernel, n in counts.items()]
        return lines

    def _session_for(self, args) -> tuple:
        values = tuple(int(args[i]) for i in self.slots)
        if values not in self.sessions:
            self.sessions[values] = _session(self.gm, list(args), dict(zip(self.slots, values)))
        return self.sessions[values]

    def __call__(self, *args):
        session, inputs, layout = self._session_for(args)
        feeds = [args[i] for i in inputs]
        return layout_outputs(layout, session(*feeds), feeds)


def release_constants(gm: fx.GraphModule) -> None:
    """Replace the constants registered on ``gm`` itself (the passes' quantized weights and scales)
    by shape-only tensors on the meta device: the graph still reads as it did (``explain``, its
    code), the bytes are gone, and running it raises instead of computing with them. Only the
    root's own entries are rebound: a submodule may be the user's, and no tensor is changed."""
    for name, value in list(gm._buffers.items()):
        if value is not None and value.device.type != "meta":
            gm._buffers[name] = torch.empty_like(value, device="meta")


def build(gm: fx.GraphModule, example_inputs, strict: bool = False):
    try:
        graph = OrtGraph(gm, list(example_inputs))
    except Exception as exc:
        reason = f"the ONNX export failed ({root_message(exc)})"
        if strict:
            raise OrtExportError(f"target 'ort' cannot run this graph: {reason}. Use target='inductor', or "
                                 f"target='auto' to let qcompile fall back") from exc
        fallback = Chosen(inductor.build(gm, example_inputs), "inductor", f"ort: {reason}; compiled by Inductor instead")
        warnings.warn(f"qcompile target 'auto': {fallback.fallback_reason}", stacklevel=2)
        return fallback
    return graph
