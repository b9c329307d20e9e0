"""The exceptions a user can fix: one type per kind of mistake, the problem and the fix in the
message's first line.

Plain Python (no torch import), so the command line and the recipe table can raise them without
loading torch. Inside ``torch.compile`` the backend re-raises them through Dynamo unwrapped
(``qcompiler.api.backend``), so the user sees this exception, not a compiler stack.
"""
from __future__ import annotations


class QcompileError(Exception):
    """Base of every error qcompile reports about its input: options, data, models, files."""


class OptionError(QcompileError, ValueError):
    """An unknown recipe, an unknown option, or an option value the recipe cannot take."""


class CalibrationError(QcompileError, ValueError):
    """Calibration data or calibration state that the compiler cannot use."""


class TargetUnavailable(QcompileError, RuntimeError):
    """A target the user named explicitly cannot run this graph; the message says why and the fix."""


class ExportError(QcompileError, RuntimeError):
    """The model cannot be exported as asked, or the file written is not a valid ONNX model."""


class InvalidFile(QcompileError, ValueError):
    """A file given to qcompile is missing, not ONNX, or damaged."""


class TrainingError(QcompileError, RuntimeError):
    """Quantization-aware training that cannot go on (a loss that is not finite); the message names the step."""


class MissingDependency(QcompileError, ImportError):
    """An optional package this path needs is not installed; the message names the extra."""
