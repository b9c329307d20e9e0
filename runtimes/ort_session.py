"""An ONNX Runtime session behind a Python callable: torch tensors in, torch tensors out.

Inputs are bound by pointer (no copy); outputs are allocated by ONNX Runtime and handed to torch
without a copy on the CPU. Where this onnxruntime has them, a call wraps every input and hands every
output over in one call each (``BatchedRun``); otherwise it binds them one by one (``DirectBinding``,
``PublicBinding``). Session options are the ones the ``ort`` target was measured with.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Optional, Sequence

import numpy as np
import onnx
import torch

from qcompiler.errors import MissingDependency
from qcompiler.runtimes.denormals import flushing
from qcompiler.runtimes.ort_slow_fusions import disabled_optimizers, op_types

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
          torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_, torch.float64: np.float64}
_NUMPY_DTYPES = {k: np.dtype(v) for k, v in _NUMPY.items()}


def require_onnxruntime():
    """onnxruntime, or ``MissingDependency`` naming the extra that installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("the 'ort' target and ONNX export need onnxruntime and onnx: "
                                "pip install onnx onnxruntime (qcompiler's own dependencies)") from None
    return onnxruntime


def require_onnx():
    """onnx, or ``MissingDependency`` naming the extra that installs it."""
    try:
        import onnx
    except ImportError:
        raise MissingDependency("reading and checking ONNX files needs onnx: pip install onnx (a qcompiler dependency)") from None
    return onnx


def session_options(threads: Optional[int] = None, flush_denormals: bool = True):
    ort = require_onnxruntime()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    # ORT's QDQ fusions re-quantize what our graphs keep exact: DequantizeLinear -> MatMul becomes
    # MatMulNBits at accuracy level 4 (activations re-quantized to int8) and Q/DQ -> MatMul
    # becomes a u8 x s8 MatMulIntegerToFloat that saturates on CPUs without VNNI (docs/experiments.md, "ONNX export").
    # The ort form already states its integer kernels explicitly, so nothing is lost.
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    # ORT's worker threads busy-wait between nodes, and by default after each run too. After a run
    # they share the cores with torch's thread pool, the Python around the call (transformers'
    # generate()) and the other graphs' sessions, and the spinning starves them; inside a run it
    # spares a thread wake-up per parallel node. So they spin during a run only
    # (benchmarks/experiments/ort_spinning.py, docs/results/ort_spinning.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    # denormal floats flushed to zero on the session's worker threads (``runtimes.denormals``; the
    # calling thread is flushed around each run)
    if flush_denormals:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    return so


def graph_of(model):
    """The ``onnx.ModelProto`` of ``model`` (a path, bytes or a proto), a file's weights unread."""
    if isinstance(model, str):
        return require_onnx().load(model, load_external_data=False)
    if isinstance(model, bytes):
        return require_onnx().load_from_string(model)
    return model


def slow_fusions_of(model) -> list:
    """The ONNX Runtime optimizers ``SLOW_FUSIONS`` turns off for ``model`` (a path, bytes or a proto)."""
    return disabled_optimizers(op_types(graph_of(model).graph))


def inference_session(model, options=None, threads: Optional[int] = None, disabled: Optional[Sequence[str]] = None):
    """``onnxruntime.InferenceSession`` of ``model`` (bytes or a path) on the CPU, with ``options``
    (default: ``session_options(threads)``), without the optimizers ``disabled`` (default: those
    ``slow_fusions_of(model)``), made so that the calling thread keeps its denormal mode
    (``runtimes.denormals``)."""
    ort = require_onnxruntime()
    disabled = slow_fusions_of(model) if disabled is None else list(disabled)
    with flushing():  # ONNX Runtime would leave the process's first session's flushing on this thread
        return ort.InferenceSession(model, options or session_options(threads), providers=PROVIDERS,
                                    disabled_optimizers=disabled)


# qcompile's sessions run on ONNX Runtime's CPU provider (the 'ort' target is the CPU target; on a
# GPU qcompile runs 'triton', 'inductor' or, with TensorRT installed, 'tensorrt')
PROVIDERS = ["CPUExecutionProvider"]


class OrtSession:
    """Runs one ONNX model; ``__call__(*tensors) -> list of tensors`` in the model's output order.
    ``parameters``: the positions of the inputs that are model parameters (``parameter_names``).
    ``disabled``: the ONNX Runtime optimizers to run without; by default those ``SLOW_FUSIONS``
    turns off for this model's ops (``disabled_optimizers`` says which were). ``flush_denormals``:
    denormal floats flushed to zero in a run (``runtimes.denormals``; off only to measure it)."""

    def __init__(self, model, threads: Optional[int] = None, parameters: Sequence[int] = (),
                 disabled: Optional[Sequence[str]] = None, flush_denormals: bool = True):
        ort = require_onnxruntime()
        data = model if isinstance(model, (bytes, str)) else model.SerializeToString()
        self._source = model  # a path is read again only when ``model`` is asked for
        self._ort = ort
        self.disabled_optimizers = slow_fusions_of(model) if disabled is None else list(disabled)
        self.flush_denormals = flush_denormals
        self._binder = DirectBinding if DirectBinding.available() else PublicBinding
        self.session = inference_session(data, session_options(threads, flush_denormals), disabled=self.disabled_optimizers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._bfloat16_outputs = [o.type == "tensor(bfloat16)" for o in self.session.get_outputs()]
        self._batched = BatchedRun(self) if BatchedRun.available() else None
        # the inputs that are the model's own parameters, bound to its memory at every call (a tool
        # that rebuilds the file, a peer quantizer say, may make them constants again)
        self.parameter_names = [self.input_names[k] for k in parameters]

    @property
    def session(self):
        """The ``onnxruntime.InferenceSession`` that runs the calls. A tool may replace it (a profiled
        session of the same model): the batched run's calls are bound to a session, and are bound
        to the new one."""
        return self._session

    @session.setter
    def session(self, session) -> None:
        self._session = session
        if getattr(self, "_batched", None) is not None:
            self._batched = BatchedRun(self)

    @property
    def model(self):
        """What runs (for sizes and for tools that rewrite it): the ``onnx.ModelProto``, loaded
        from the file when the session was made from a path (the session does not hold it)."""
        if isinstance(self._source, str):
            return require_onnx().load(self._source)
        if isinstance(self._source, bytes):
            return require_onnx().load_from_string(self._source)
        return self._source

    @property
    def graph(self):
        """The ``onnx.ModelProto`` without its weights' bytes (a cached file's side file unread)."""
        return graph_of(self._source)

    def __call__(self, *tensors: torch.Tensor) -> list:
        if len(tensors) != len(self.input_names):
            raise ValueError(f"the ONNX model takes {len(self.input_names)} inputs {self.input_names}, got {len(tensors)}")
        if self._batched is not None and all(t.dtype in _NUMPY for t in tensors):  # numpy has no bfloat16
            return self._batched(tensors)
        binding = self._binder(self.session)
        keep = []  # copies made here must outlive the run
        for name, t in zip(self.input_names, tensors):
            if not (t.is_cpu and t.is_contiguous()):  # a decode step's inputs are: bound as they are
                t = t.detach().contiguous().cpu()
                keep.append(t)
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hand ORT the bits with their ONNX type
                value = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                    t.detach().view(torch.int16).numpy(), onnx.TensorProto.BFLOAT16)
                keep.append(value)
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_input(name, _NUMPY[t.dtype], tuple(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name)
        with flushing() if self.flush_denormals else contextlib.nullcontext():
            binding.run()
        return [_to_torch(v) if bfloat16 else torch.from_numpy(v.numpy())
                for v, bfloat16 in zip(binding.outputs(), self._bfloat16_outputs)]


class PublicBinding:
    """Binds through onnxruntime's documented ``IOBinding``."""

    def __init__(self, session):
        self.session, self.binding = session, session.io_binding()

    def bind_input(self, name, dtype, shape, pointer) -> None:
        self.binding.bind_input(name, "cpu", 0, dtype, shape, pointer)

    def bind_ortvalue_input(self, name, value) -> None:
        self.binding.bind_ortvalue_input(name, value)

    def bind_output(self, name) -> None:
        self.binding.bind_output(name, "cpu")

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding)

    def outputs(self) -> list:
        return self.binding.get_outputs()


class DirectBinding:
    """Binds through the extension module under ``IOBinding``: the same calls, without the wrapper's
    per-tensor device objects and checks (a decode step binds every layer's cache; the saving is
    not measured by a benchmark page). ``available()`` says whether this onnxruntime has it;
    ``OrtSession`` uses ``PublicBinding`` otherwise."""

    def __init__(self, session):
        from onnxruntime.capi import _pybind_state

        self.session = session._sess
        self.binding = _pybind_state.SessionIOBinding(self.session)
        self.cpu = _cpu_device()

    @staticmethod
    def available() -> bool:
        try:
            from onnxruntime.capi import _pybind_state

            return hasattr(_pybind_state, "SessionIOBinding") and _cpu_device() is not None
        except (ImportError, AttributeError, TypeError):
            return False

    def bind_input(self, name, dtype, shape, pointer) -> None:
        self.binding.bind_input(name, self.cpu, dtype, shape, pointer)

    def bind_ortvalue_input(self, name, value) -> None:
        self.binding.bind_ortvalue_input(name, value._ortvalue)

    def bind_output(self, name) -> None:
        self.binding.bind_output(name, self.cpu)

    def run(self) -> None:
        self.session.run_with_iobinding(self.binding, None)

    def outputs(self) -> list:
        found = self.binding.get_outputs()
        return [found[i] for i in range(len(found))]


class BatchedRun:
    """Runs a session through the extension module's batched calls: every input wrapped in one call
    (``OrtValueVector.push_back_batch``, by pointer), every output handed to torch through DLPack in
    one call (``to_dlpacks``), as torch's own ONNX Runtime backend ran its sessions. A decode step's
    63 inputs and 61 outputs cost one Python-to-C++ crossing each way instead of one per tensor.
    ``available()`` says whether this onnxruntime has the calls; inputs must have numpy dtypes
    (``OrtSession`` binds a call with bfloat16 inputs one by one)."""

    def __init__(self, session: "OrtSession"):
        from onnxruntime.capi import _pybind_state

        self._vector = _pybind_state.OrtValueVector
        self._run = session.session._sess.run_with_ortvaluevector
        self._options = session._ort.RunOptions()
        self.input_names, self.output_names = session.input_names, session.output_names
        self._input_devices = [_cpu_device()] * len(self.input_names)
        self._output_devices = [_cpu_device()] * len(self.output_names)
        self.flush_denormals = session.flush_denormals
        self._placeholder_memory = torch.empty(8, dtype=torch.uint8)  # what an empty input points at (never read)
        self._placeholder = self._placeholder_memory.data_ptr()
        # DLPack carries ONNX Runtime's bool as uint8: viewed back as bool (the same bytes)
        self._bool_outputs = [k for k, o in enumerate(session.session.get_outputs()) if o.type == "tensor(bool)"]

    @staticmethod
    def available() -> bool:
        try:
            from onnxruntime.capi import _pybind_state

            vector = _pybind_state.OrtValueVector
            return (all(hasattr(vector, m) for m in ("push_back_batch", "to_dlpacks"))
                    and hasattr(_pybind_state.InferenceSession, "run_with_ortvaluevector") and _cpu_device() is not None)
        except (ImportError, AttributeError, TypeError):
            return False

    def __call__(self, tensors) -> list:
        tensors = [t if t.is_cpu and t.is_contiguous() else t.detach().contiguous().cpu() for t in tensors]
        feeds = self._vector()
        feeds.reserve(len(tensors))
        pointers = [t.data_ptr() or self._placeholder for t in tensors]  # an empty tensor's is 0, which ORT refuses
        feeds.push_back_batch(tensors, pointers, [_NUMPY_DTYPES[t.dtype] for t in tensors],
                              [t.shape for t in tensors], self._input_devices)
        fetches = self._vector()
        with flushing() if self.flush_denormals else contextlib.nullcontext():
            self.run(feeds, fetches)
        outputs = fetches.to_dlpacks(torch.utils.dlpack.from_dlpack)
        for k in self._bool_outputs:
            outputs[k] = outputs[k].view(torch.bool)
        return outputs

    def run(self, feeds, fetches) -> None:
        self._run(self._options, self.input_names, feeds, self.output_names, fetches, self._output_devices)


def _cpu_device():
    """The extension module's CPU ``OrtDevice`` (the one ``IOBinding`` makes for "cpu")."""
    return require_onnxruntime().OrtDevice.make("cpu", 0)._get_c_device()


def _to_torch(value) -> torch.Tensor:
    """An output OrtValue as a tensor (bfloat16 copied bit for bit: numpy cannot hold it)."""
    if value.data_type() == "tensor(bfloat16)":
        out = torch.empty(value.shape(), dtype=torch.bfloat16)
        ctypes.memmove(out.data_ptr(), value.data_ptr(), value.tensor_size_in_bytes())
        return out
    return torch.from_numpy(value.numpy())
