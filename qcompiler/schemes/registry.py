"""The scheme registry: which ``Scheme`` quantizes a linear for a recipe, keyed by ``SchemeKey``.

A ``SchemeKey`` holds everything that tells two schemes apart: the weights' number format, the
activations' number format (None: weight-only) and how activation scales are set. The registry
is importable without torch (recipes validate against it, and the command line lists recipes
without importing torch): a built-in scheme is named by where its class lives and imported on
first use; ``register_scheme`` adds a scheme object directly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

from qcompiler.errors import OptionError

WEIGHT_FORMATS = ("int8", "fp8", "int4")
ACTIVATION_FORMATS = (None, "int8", "fp8")
# None = weight-only; "dynamic" = per token at run time; "blocks" = per block of input channels at
# run time; "static" = per tensor, fixed at calibration
ACTIVATION_SCALES = (None, "dynamic", "blocks", "static")
_SCALE_TEXT = {None: "", "dynamic": " per token", "blocks": " per block of channels", "static": " per tensor (calibrated)"}


@dataclass(frozen=True)
class SchemeKey:
    """What a linear's quantization is made of: the registry's key."""

    weights: str                       # WEIGHT_FORMATS
    activations: Optional[str] = None  # ACTIVATION_FORMATS
    scale: Optional[str] = None        # ACTIVATION_SCALES: set exactly when activations are

    def __str__(self) -> str:
        acts = "weight-only" if self.activations is None else f"{self.activations} activations{_SCALE_TEXT[self.scale]}"
        return f"{self.weights} weights, {acts}"


# key -> "module:Class" of a built-in scheme; one line per built-in scheme
BUILT_IN = {
    SchemeKey("int8"): "qcompiler.schemes.weight_only_8bit:WeightOnly8Bit",
    SchemeKey("fp8"): "qcompiler.schemes.weight_only_8bit:WeightOnly8Bit",
    SchemeKey("int8", "int8", "dynamic"): "qcompiler.schemes.per_token_8bit:PerToken8Bit",
    SchemeKey("fp8", "fp8", "dynamic"): "qcompiler.schemes.per_token_8bit:PerToken8Bit",
    SchemeKey("int8", "int8", "blocks"): "qcompiler.schemes.per_block_8bit:PerBlock8Bit",
    SchemeKey("int8", "int8", "static"): "qcompiler.schemes.per_tensor_8bit:PerTensor8Bit",
    SchemeKey("fp8", "fp8", "static"): "qcompiler.schemes.per_tensor_8bit:PerTensor8Bit",
    SchemeKey("int4"): "qcompiler.schemes.int4_grouped:Int4Grouped",
}


class SchemeRegistry:
    """Schemes by key: built-ins imported on first use, others registered as objects."""

    def __init__(self, built_in: dict):
        self._paths = dict(built_in)
        self._schemes = {}

    def keys(self) -> list:
        return sorted(set(self._paths) | set(self._schemes), key=str)

    def __contains__(self, key: SchemeKey) -> bool:
        return key in self._paths or key in self._schemes

    def register(self, key: SchemeKey, scheme) -> None:
        if key in self:
            raise OptionError(f"a scheme for {key} is already registered")
        self._schemes[key] = scheme

    def unregister(self, key: SchemeKey) -> None:
        """Remove a scheme added with ``register`` (built-ins stay)."""
        self._schemes.pop(key, None)

    def get(self, key: SchemeKey):
        if key not in self._schemes:
            if key not in self._paths:
                raise OptionError(f"no scheme quantizes {key}; the registered schemes: "
                                  f"{'; '.join(map(str, self.keys()))}")
            module, cls = self._paths[key].split(":")
            self._schemes[key] = getattr(importlib.import_module(module), cls)(key)
        return self._schemes[key]


SCHEMES = SchemeRegistry(BUILT_IN)


def register_scheme(key: SchemeKey, scheme) -> None:
    """Add a scheme: recipes whose weights and activations give ``key`` quantize with it."""
    SCHEMES.register(key, scheme)
