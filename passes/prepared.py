"""A layer's calibration-time weight (AWQ / GPTQ), fetched and checked against the recipe compiling it."""
from __future__ import annotations

from qcompiler.calibration.state import prepared_for
from qcompiler.errors import CalibrationError


def checked_prepared(m, recipe):
    """The calibration-time weight of an AWQ / GPTQ layer (``m``: its ``LinearMatch``), checked
    against the recipe; None for recipes that round without calibration."""
    if not recipe.calibrated_rounding:
        return None
    prepared = prepared_for(m.param)
    fix = (f"run `qcompiler.calibrate(model, batches, recipe={recipe.name!r})` (with the same recipe "
           f"options) before compiling")
    if prepared is None or prepared.weight is None:
        raise CalibrationError(f"recipe {recipe.name!r} rounds weights with {recipe.algorithm.upper()} on "
                               f"calibration data, but {m.module!r} has no prepared weight: {fix}")
    if prepared.key != recipe.prepared_key:
        raise CalibrationError(f"{m.module!r} was calibrated for a different INT4 setting {prepared.key} "
                               f"than the recipe asks for {recipe.prepared_key}: {fix}")
    return prepared
