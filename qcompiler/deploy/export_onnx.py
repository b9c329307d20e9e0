"""``qcompiler.export_onnx``: a model, quantized by a recipe, written as one ONNX file.

The model is captured whole by ``torch.export`` (batch and sequence dimensions dynamic), the
same passes as ``torch.compile`` quantize it, and ``lowering.onnx`` writes the q-op graph in the
TensorRT form (QDQ, checked by ``qcompiler.deploy.onnx_check``) or the ORT form. Calibration
statistics and AWQ/GPTQ weights come from ``qcompiler.calibrate`` on the same model, as for
compilation; nothing is re-derived here.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from qcompiler import recipes
from qcompiler.api.calibrate import calibrate
from qcompiler.api.explain import findings
from qcompiler.deploy.modes import evaluating
from qcompiler.errors import ExportError
from qcompiler.model_signature import takes_argument
from qcompiler.passes.meta import FLOATING_POINT

@dataclass
class ExportResult:
    path: str
    form: str
    decisions: list = field(repr=False)
    violations: list            # onnx_check findings (TensorRT form); empty when conformant
    file_bytes: int

    def summary(self) -> str:
        linears = [d for d in self.decisions if d.op == "linear"]
        quantized = sum(1 for d in linears if d.scheme != FLOATING_POINT)
        tables = [d for d in self.decisions if d.op == "embedding" and d.scheme != FLOATING_POINT]
        lines = [f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, {self.form} form): "
                 f"{quantized} of {len(linears)} linears quantized"
                 + (f", {len(tables)} embedding table(s) INT8" if tables else "")]
        lines += findings(self.decisions)
        if self.form == "tensorrt":
            lines.append("TensorRT explicit-quantization check: " +
                         ("clean" if not self.violations else f"{len(self.violations)} violation(s)"))
            lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)


def _split(example_inputs) -> tuple:
    """(args, kwargs), every tensor contiguous: a slice of a larger tensor (``ids[:2, :16]``) has
    strides the sizes do not give, and export would carry them as symbols ONNX cannot express."""
    def dense(v):
        return v.contiguous() if isinstance(v, torch.Tensor) else v

    if isinstance(example_inputs, Mapping):
        return (), {k: dense(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, torch.Tensor):
        return (dense(example_inputs),), {}
    return tuple(dense(v) for v in example_inputs), {}


def _auto_dims(args, kwargs):
    from qcompiler.lowering.onnx import auto_dims

    return tuple(auto_dims(a) for a in args) if args else None, {k: auto_dims(v) for k, v in kwargs.items()} or None


def export_onnx(model: nn.Module, example_inputs: Union[torch.Tensor, tuple, Mapping], path: str, *,
                recipe: Union[str, recipes.Recipe] = "w8a8-smoothquant", form: str = "tensorrt",
                calibration: Optional[Iterable] = None, dynamic_shapes: Any = None,
                options: Optional[Mapping] = None) -> ExportResult:
    """Quantize ``model`` with ``recipe`` and write it to ``path`` as ONNX.

    Args:
        model: the model (not modified), in float32, float16 or bfloat16; a half-precision model
            is exported in float32 with its dtype at the file's inputs and outputs.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        path: the .onnx file (weights go to a side file ``<path>.data`` above 2 GB).
        recipe: a recipe name or ``Recipe``; static recipes need calibration (``calibration``
            here, or an earlier ``qcompiler.calibrate(model, ...)``).
        form: "tensorrt" (QDQ, explicit quantization; checked) or "ort" (ONNX Runtime's fast
            integer kernels: MatMulInteger, MatMulNBits).
        calibration: batches to calibrate on first (as ``qcompiler.calibrate`` takes them).
        dynamic_shapes: as ``torch.export`` takes them; default: every input dimension the
            model does not pin (batch, sequence) dynamic.
        options: more recipe fields, as ``torch.compile(..., options=...)`` takes them.

    Example:
        >>> qcompiler.export_onnx(model, batch, "model.onnx", recipe="w8a8-smoothquant", calibration=batches)
    """
    from qcompiler.deploy import onnx_check
    from qcompiler.lowering.onnx import PROTOBUF_LIMIT, to_onnx, with_io_dtype
    from qcompiler.passes.pipeline import run_passes
    from qcompiler.runtimes.ort_session import require_onnxruntime

    require_onnxruntime()
    import onnx

    resolved = recipes.resolve({**dict(options or {}), "recipe": recipe})
    half = _half_dtype(model)
    if calibration is not None:
        calibrate(model, calibration, recipe=resolved if resolved.rounds_weights or resolved.mixed_precision else None)
    args, kwargs = _split(example_inputs)
    if half is not None:  # exported in float32 (same quantized weights), its interface in `half`
        model = copy.deepcopy(model).float()
        args, kwargs = _as_float32(args), dict(zip(kwargs, _as_float32(kwargs.values())))
    kwargs = _without_cache(model, kwargs)
    if dynamic_shapes is None:
        pos, kw = _auto_dims(args, kwargs)
        dynamic_shapes = kw if kw else pos
    with evaluating(model), torch.no_grad():  # the inference graph, whatever the modes; each restored
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    gm = program.module()
    flat = list(args) + list(kwargs.values())
    decisions = run_passes(gm, flat, resolved).decisions
    proto = to_onnx(gm, args, form, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                    input_names=list(kwargs) if kwargs else None)
    if half is not None:
        proto = with_io_dtype(proto, half)
    violations = onnx_check.check(proto) if form == "tensorrt" else []
    large = proto.ByteSize() >= PROTOBUF_LIMIT
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save_model(proto, path, save_as_external_data=large, location=os.path.basename(path) + ".data" if large else None)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if large else 0)
    _validate(path)
    return ExportResult(path, form, decisions, violations, size)


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """A decoder is exported without its KV cache (``use_cache=False``) unless the example says
    otherwise: a cache object is not a tensor output ONNX can carry."""
    takes = takes_argument(model, "use_cache")
    return {**kwargs, "use_cache": False} if takes and "use_cache" not in kwargs else kwargs


def _half_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """None for a float32 model; float16 / bfloat16 for a model in one of them (exported with that
    interface); a model mixing float dtypes is refused, naming them."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes <= {torch.float32}:
        return None
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.float16, torch.bfloat16):
        return next(iter(dtypes))
    raise ExportError(f"export_onnx takes a model in one float dtype; this one mixes "
                      f"{', '.join(sorted(str(d) for d in dtypes))}: convert it with `model.to(dtype)` first")


def _as_float32(values) -> tuple:
    return tuple(v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values)


def _validate(path: str) -> None:
    """The full ONNX check (types and shapes inferred) and an ONNX Runtime session load: a file that
    fails either is an error, not a result."""
    import onnx

    from qcompiler.runtimes.ort_session import OrtSession

    try:
        onnx.checker.check_model(path, full_check=True)
        OrtSession(path)
    except Exception as exc:
        raise ExportError(f"the exported file {path} is not a valid ONNX model ({type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0][:300]}); please report it with the model") from exc
