"""A layer's calibration-time weight (AWQ / GPTQ), fetched and checked against the recipe compiling it."""
from __future__ import annotations

from qcompiler.calibration.state import checked_prepared_weight, prepared_for


def checked_prepared(m, recipe):
    """The calibration-time weight of an AWQ / GPTQ layer, or the trained weight of any layer
    (``m``: its ``LinearMatch``), checked against the recipe; None for recipes that round without
    calibration on a layer that was not trained."""
    return checked_prepared_weight(prepared_for(m.param), m.module, recipe, "compiling")
