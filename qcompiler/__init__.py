"""qcompile: a quantization compiler for PyTorch.

    fast = torch.compile(model, backend="qcompile")                       # dynamic W8A8
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w8a8-smoothquant"})
    with qcompiler.calibrate(fast):
        for batch in batches: fast(batch)
    print(qcompiler.explain(fast))

Importing registers the ``qcompile::*`` ops; it changes no global torch configuration.
"""
from qcompiler import ops  # noqa: F401  (registers the q-op IR)
from qcompiler.backend import qcompile_backend
from qcompiler.calibration import CalibrationError, calibrate
from qcompiler.explain import Report, explain
from qcompiler.export import ExportError, export_onnx
from qcompiler.lowering import TargetUnavailable
from qcompiler.recipes import Recipe, get_recipe, list_recipes, register_recipe
from qcompiler.state import QuantState, state_of

__all__ = ["qcompile_backend", "calibrate", "CalibrationError", "explain", "Report", "export_onnx", "ExportError",
           "TargetUnavailable", "QuantState", "state_of", "Recipe", "get_recipe", "list_recipes", "register_recipe"]
__version__ = "0.1.0"
