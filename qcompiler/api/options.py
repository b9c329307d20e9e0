"""Options: what a user passes to ``torch.compile(..., options=...)``, checked and resolved.

``split_options`` turns an options dict into a ``Recipe`` and a target name (an unknown key or
value is an ``OptionError`` listing the valid ones); ``compile_options`` reads the ``torch.compile``
call behind a compiled model, so its options can be checked where the user first hands the
compiled model to qcompile (``calibrate``), not minutes later at the first compiled call.
"""
from __future__ import annotations

from typing import Mapping, Optional

from qcompiler import recipes, torch_compat
from qcompiler.errors import OptionError
from qcompiler.lowering import get_lowering

BACKEND_OPTIONS = ("recipe", "target", "cuda_graphs")


def split_options(options: Optional[Mapping]) -> tuple:
    """options -> (Recipe, target name); unknown keys are an error listing the valid ones."""
    options = dict(options or {})
    target = options.pop("target", "auto")
    options.pop("cuda_graphs", None)  # a lowering option: qcompile_backend reads it
    fields = recipes.fields_of_recipes()
    unknown = sorted(set(options) - fields - {"recipe"})
    if unknown:
        raise OptionError(f"unknown qcompile option(s) {unknown}; valid options: "
                          f"{sorted(BACKEND_OPTIONS)} and the recipe fields {sorted(fields)}")
    return recipes.resolve(options), target


def compile_options(compiled) -> Optional[dict]:
    """The options of the ``torch.compile(..., backend="qcompile")`` call behind ``compiled``
    (``{}`` when it gave none), or None when ``compiled`` is not a qcompile compile."""
    wrapper = torch_compat.compile_of(compiled)
    if wrapper is None:
        return None
    backend, options = torch_compat.compile_settings(wrapper)
    return options if backend == "qcompile" else None


def check_compile(compiled) -> None:
    """Raise ``OptionError`` now if ``compiled`` came from a qcompile compile whose options are wrong
    (an unknown recipe or option, a value a recipe cannot take, an unknown target)."""
    options = compile_options(compiled)
    if options is not None:
        _, target = split_options(options)
        if target != "auto":
            get_lowering(target)
