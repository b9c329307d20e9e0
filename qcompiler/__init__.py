"""qcompile: a quantization compiler for PyTorch.

    fast = torch.compile(model, backend="qcompile")                       # dynamic W8A8
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothquant"})
    with qcompiler.calibrate(fast):
        for batch in batches: fast(batch)
    print(qcompiler.explain(fast))
    qcompiler.save(fast, "state/")        # later, in any process: qcompiler.load(model, "state/")

The names below load on first use (``import qcompiler`` alone does not import torch, so the
command line starts at once); using the backend registers the ``qcompile::*`` ops. Nothing here
changes global torch configuration.
"""
import importlib

# public name -> the module that defines it
_EXPORTS = {
    "qcompile_backend": "qcompiler.api.backend",
    "calibrate": "qcompiler.api.calibrate", "Calibration": "qcompiler.api.calibrate",
    "explain": "qcompiler.api.explain", "Report": "qcompiler.api.explain",
    "export_onnx": "qcompiler.deploy.export_onnx",
    "save": "qcompiler.deploy.artifacts", "load": "qcompiler.deploy.artifacts",
    "build_engine": "qcompiler.runtimes.tensorrt_engine",
    "export_checkpoint": "qcompiler.deploy.checkpoint",
    "QuantizedKVCache": "qcompiler.api.kv_cache",
    "QcompileError": "qcompiler.errors", "OptionError": "qcompiler.errors",
    "CalibrationError": "qcompiler.errors", "ExportError": "qcompiler.errors", "InvalidFile": "qcompiler.errors",
    "MissingDependency": "qcompiler.errors", "TargetUnavailable": "qcompiler.errors",
    "TrainingError": "qcompiler.errors",
    "QuantState": "qcompiler.calibration.state", "state_of": "qcompiler.calibration.state",
    "Recipe": "qcompiler.recipes", "get_recipe": "qcompiler.recipes", "list_recipes": "qcompiler.recipes",
    "register_recipe": "qcompiler.recipes",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:  # submodules as attributes (qcompiler.api, qcompiler.passes, ...)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'qcompiler' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
