"""TensorRT engines from qcompile's TensorRT-form ONNX: build one, cache it on disk, run it on torch
tensors.

``build_engine`` uses TensorRT 10's Python API as documented: a *strongly typed* network parsed
from the explicit-quantization ONNX (every Q/DQ pair fixes its tensor's type, so no precision flag
is set: INT8, FP8 and blocked INT4 come from the file), one optimization profile whose ranges
cover the dynamic batch and sequence dimensions, an optional timing cache read before and written
after the build, and the serialized engine written to a file. ``Engine`` deserializes one and runs
it with torch CUDA tensors bound by address on the current stream.

TensorRT is optional (``pip install 'qcompiler[tensorrt]'``): nothing here imports it until an
engine is built or run, and ``MissingDependency`` says what to install. ``profile_shapes`` needs
only ``onnx``; it is what decides the profile, and is tested without TensorRT.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
from typing import Mapping, Optional, Sequence, Union

import torch

from qcompiler.errors import InvalidFile, MissingDependency, OptionError
from qcompiler.runtimes.disk_cache import cache_folder
from qcompiler.runtimes.ort_session import require_onnx

INSTALL = "pip install 'qcompiler[tensorrt]' (TensorRT 10's wheels, served from NVIDIA's package index)"


def require_tensorrt():
    """The ``tensorrt`` module, or ``MissingDependency`` naming what to install."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependency(f"building or running a TensorRT engine needs TensorRT: {INSTALL}") from None
    return tensorrt


def _load_onnx(onnx_model):
    onnx = require_onnx()
    if isinstance(onnx_model, onnx.ModelProto):
        return onnx_model
    path = pathlib.Path(onnx_model)
    if not path.is_file():
        raise InvalidFile(f"{path}: no such file (give the .onnx file qcompiler.export_onnx wrote)")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise InvalidFile(f"{path} is not an ONNX model ({type(e).__name__}): export one with "
                          f"qcompiler.export_onnx(..., form='tensorrt')") from None


def _graph_inputs(model) -> list:
    """The model's inputs a caller feeds (initializers listed as inputs are not)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def profile_shapes(onnx_model, shapes: Optional[Mapping] = None, *, max_batch: int = 8, max_seq: int = 1024,
                   opt_batch: int = 1, opt_seq: int = 128) -> dict:
    """``{input name: (min, opt, max)}`` shapes of the optimization profile for an ONNX model's inputs.

    A static dimension is its own min, opt and max. A dynamic one (a ``dim_param``, as qcompile's
    exports have for batch and sequence) ranges over ``[1, max_batch]`` (axis 0, optimized for
    ``opt_batch``) or ``[1, max_seq]`` (any other axis, optimized for ``opt_seq``). ``shapes`` gives
    an input's triple explicitly instead; it is checked against the input's rank and static sizes.
    """
    model = _load_onnx(onnx_model)
    if not (1 <= opt_batch <= max_batch and 1 <= opt_seq <= max_seq):
        raise OptionError(f"need 1 <= opt_batch <= max_batch and 1 <= opt_seq <= max_seq; got opt_batch={opt_batch}, "
                          f"max_batch={max_batch}, opt_seq={opt_seq}, max_seq={max_seq}")
    inputs = _graph_inputs(model)
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {i.name for i in inputs})
    if unknown:
        raise OptionError(f"shapes given for {unknown}, which are not inputs of the model; its inputs: "
                          f"{[i.name for i in inputs]}")
    out = {}
    for inp in inputs:
        dims = inp.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if inp.name in shapes:
            triple = tuple(tuple(int(v) for v in s) for s in shapes[inp.name])
            if len(triple) != 3 or any(len(s) != len(static) for s in triple):
                raise OptionError(f"shapes[{inp.name!r}] must be three shapes (min, opt, max) of rank {len(static)}")
            for axis, size in enumerate(static):
                lo, opt, hi = (s[axis] for s in triple)
                if size is not None and not lo == opt == hi == size:
                    raise OptionError(f"shapes[{inp.name!r}]: axis {axis} is static ({size}) in the model")
                if not 1 <= lo <= opt <= hi:
                    raise OptionError(f"shapes[{inp.name!r}]: axis {axis} needs 1 <= min <= opt <= max, "
                                      f"got {lo}, {opt}, {hi}")
            out[inp.name] = triple
            continue
        lo, opt, hi = [], [], []
        for axis, size in enumerate(static):
            if size is not None:
                rng = (size, size, size)
            elif axis == 0:
                rng = (1, opt_batch, max_batch)
            else:
                rng = (1, opt_seq, max_seq)
            for acc, v in zip((lo, opt, hi), rng):
                acc.append(v)
        out[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def build_engine(onnx_path: Union[str, os.PathLike], engine_path: Union[str, os.PathLike], *,
                 shapes: Optional[Mapping] = None, max_batch: int = 8, max_seq: int = 1024, opt_batch: int = 1,
                 opt_seq: int = 128, timing_cache: Optional[Union[str, os.PathLike]] = None,
                 workspace_gib: Optional[float] = None) -> pathlib.Path:
    """Build a TensorRT engine from a TensorRT-form ONNX file (``qcompiler.export_onnx``) and write it.

    Args:
        onnx_path: the ONNX file (explicit quantization: Q/DQ pairs, INT8 / FP8 / blocked INT4).
        engine_path: where the serialized engine goes.
        shapes, max_batch, max_seq, opt_batch, opt_seq: the optimization profile (``profile_shapes``).
        timing_cache: a file read before the build (when it exists) and rewritten after it, so
            later builds on this GPU and TensorRT version skip the kernel timing they share.
        workspace_gib: cap on the builder's scratch memory (TensorRT's default otherwise).

    Returns the engine's path. Raises ``InvalidFile`` for a file that is not ONNX, ``OptionError``
    for a bad profile, ``MissingDependency`` without TensorRT, ``RuntimeError`` with the parser's or
    builder's messages when TensorRT refuses the network.
    """
    profile = profile_shapes(onnx_path, shapes, max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch,
                             opt_seq=opt_seq)
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser refused {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    cache_file = pathlib.Path(timing_cache) if timing_cache is not None else None
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file and cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    out = pathlib.Path(engine_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(serialized))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    return out


def engine_cache_dir() -> pathlib.Path:
    """Where ``target="tensorrt"`` keeps its engines: ``$QCOMPILE_CACHE/engines``, else
    ``~/.cache/qcompile/engines``."""
    return cache_folder("engines")


def engine_key(onnx_bytes: bytes, profile: Mapping, device: torch.device) -> str:
    """The cache key of an engine: the ONNX file, the profile, the GPU and the TensorRT version."""
    trt = require_tensorrt()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    digest = hashlib.sha256(onnx_bytes)
    digest.update(repr(sorted(profile.items())).encode())
    digest.update(f"{name}|{trt.__version__}".encode())
    return digest.hexdigest()


def _torch_dtype(trt, dtype):
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
             "FP8": torch.float8_e4m3fn}
    for name, value in table.items():
        if hasattr(trt.DataType, name) and dtype == getattr(trt.DataType, name):
            return value
    raise RuntimeError(f"engine tensor type {dtype} has no torch equivalent")


class Engine:
    """A deserialized engine: ``__call__(*cuda_tensors)`` in the engine's input order returns its
    outputs as new torch tensors, run on the current CUDA stream."""

    def __init__(self, engine_bytes: bytes):
        trt = require_tensorrt()
        self._trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise InvalidFile("the TensorRT engine could not be deserialized (built by another TensorRT version "
                              "or for another GPU?): build it again")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.inputs = [n for n in names if is_input(n)]
        self.outputs = [n for n in names if not is_input(n)]

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Engine":
        return cls(pathlib.Path(path).read_bytes())

    def __call__(self, *tensors: torch.Tensor) -> list:
        if len(tensors) != len(self.inputs):
            raise ValueError(f"the engine takes {len(self.inputs)} inputs ({self.inputs}), got {len(tensors)}")
        keep = []
        for name, t in zip(self.inputs, tensors):
            if t.device.type != "cuda":
                raise ValueError(f"engine input {name!r} is on {t.device}; TensorRT runs on CUDA tensors")
            want = _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))
            t = t.to(want).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        device = keep[0].device if keep else torch.device("cuda")
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=_torch_dtype(self._trt, self.engine.get_tensor_dtype(name)), device=device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError("TensorRT failed to run the engine (its log says why)")
        return outs


def cached_engine(onnx_bytes: bytes, profile: Mapping, device: torch.device,
                  directory: Optional[pathlib.Path] = None) -> Engine:
    """The engine for ``onnx_bytes`` from the disk cache, built (once) when it is not there."""
    directory = directory or engine_cache_dir()
    key = engine_key(onnx_bytes, profile, device)
    path = directory / f"{key}.engine"
    if not path.is_file():
        onnx_file = directory / f"{key}.onnx"
        onnx_file.write_bytes(onnx_bytes)
        build_engine(onnx_file, path, shapes=profile, timing_cache=directory / "timing.cache")
        onnx_file.unlink()
    return Engine.from_file(path)


def can_run(device: torch.device) -> tuple:
    """``(ok, reason)``: whether an engine can run on ``device`` here (TensorRT installed, CUDA)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, f"TensorRT is not installed: {INSTALL}"
    if device.type != "cuda":
        return False, (f"TensorRT engines run on CUDA tensors; these are on {device.type!r}: move the model "
                       f"to 'cuda'")
    return True, ""


def input_names(onnx_model) -> Sequence[str]:
    return [i.name for i in _graph_inputs(_load_onnx(onnx_model))]
