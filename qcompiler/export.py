"""``qcompiler.export_onnx``: a model, quantized by a recipe, written as one ONNX file.

The model is captured whole by ``torch.export`` (batch and sequence dimensions dynamic), the
same passes as ``torch.compile`` quantize it, and ``lowering.onnx`` writes the q-op graph in the
TensorRT form (QDQ, checked by ``qcompiler.onnx_check``) or the ORT form. Calibration
statistics and AWQ/GPTQ weights come from ``qcompiler.calibrate`` on the same model, as for
compilation; nothing is re-derived here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from qcompiler import recipes
from qcompiler.calibration import calibrate
from qcompiler.errors import ExportError
from qcompiler.report import findings

_TWO_GB = 2**31


@dataclass
class ExportResult:
    path: str
    form: str
    decisions: list = field(repr=False)
    violations: list            # onnx_check findings (TensorRT form); empty when conformant
    file_bytes: int

    def summary(self) -> str:
        quantized = sum(1 for d in self.decisions if d.scheme != "floating point")
        lines = [f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB, {self.form} form): "
                 f"{quantized} of {len(self.decisions)} linears quantized"]
        lines += findings(self.decisions)
        if self.form == "tensorrt":
            lines.append("TensorRT explicit-quantization check: " +
                         ("clean" if not self.violations else f"{len(self.violations)} violation(s)"))
            lines += [f"  {v}" for v in self.violations]
        return "\n".join(lines)


def _split(example_inputs) -> tuple:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _auto_dims(args, kwargs):
    from qcompiler.lowering.onnx import auto_dims

    return tuple(auto_dims(a) for a in args) if args else None, {k: auto_dims(v) for k, v in kwargs.items()} or None


def export_onnx(model: nn.Module, example_inputs: Union[torch.Tensor, tuple, Mapping], path: str, *,
                recipe: Union[str, recipes.Recipe] = "w8a8-smoothquant", form: str = "tensorrt",
                calibration: Optional[Iterable] = None, dynamic_shapes: Any = None,
                options: Optional[Mapping] = None) -> ExportResult:
    """Quantize ``model`` with ``recipe`` and write it to ``path`` as ONNX.

    Args:
        model: the FP32 model (not modified).
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
    from qcompiler import onnx_check
    from qcompiler.lowering.onnx import to_onnx
    from qcompiler.passes.match import match
    from qcompiler.passes.quantize import quantize
    from qcompiler.passes.smooth import smooth
    from qcompiler.runtimes.ort_session import require_onnxruntime

    require_onnxruntime()
    import onnx

    resolved = recipes.resolve({**dict(options or {}), "recipe": recipe})
    _check_float32(model)
    if calibration is not None:
        calibrate(model, calibration, recipe=resolved if resolved.rounds_weights or resolved.mixed_precision else None)
    args, kwargs = _split(example_inputs)
    kwargs = _without_cache(model, kwargs)
    if dynamic_shapes is None:
        pos, kw = _auto_dims(args, kwargs)
        dynamic_shapes = kw if kw else pos
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    finally:
        model.train(was_training)
    gm = program.module()
    flat = list(args) + list(kwargs.values())
    matches = match(gm, flat, resolved)
    decisions = quantize(gm, matches, smooth(gm, flat, matches))
    proto = to_onnx(gm, args, form, kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                    input_names=list(kwargs) if kwargs else None)
    violations = onnx_check.check(proto) if form == "tensorrt" else []
    large = proto.ByteSize() >= _TWO_GB
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    onnx.save_model(proto, path, save_as_external_data=large, location=os.path.basename(path) + ".data" if large else None)
    size = os.path.getsize(path) + (os.path.getsize(path + ".data") if large else 0)
    _validate(path)
    return ExportResult(path, form, decisions, violations, size)


def _without_cache(model: nn.Module, kwargs: dict) -> dict:
    """A decoder is exported without its KV cache (``use_cache=False``) unless the example says
    otherwise: a cache object is not a tensor output ONNX can carry."""
    import inspect

    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {**kwargs, "use_cache": False} if takes and "use_cache" not in kwargs else kwargs


def _check_float32(model: nn.Module) -> None:
    """The exported graphs keep float32 scales beside the activations: a float16 / bfloat16 model
    would make a file ONNX's checker and ONNX Runtime reject, so it is refused here."""
    dtypes = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if dtypes:
        raise ExportError(f"export_onnx takes a float32 model; this one has {', '.join(dtypes)} parameters. "
                          "Export `model.float()` (the quantized weights and scales are the same) and choose "
                          "the deployment precision in the runtime (e.g. TensorRT's --fp16 / --bf16 flags)")


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
