"""Options: what a user passes to ``torch.compile(..., options=...)``, checked and resolved.

``split_options`` turns an options dict into a ``Recipe`` and a target name (an unknown key or
value is an ``OptionError`` listing the valid ones); ``compile_of`` finds the ``torch.compile``
call behind a compiled model, so its options can be checked where the user first hands the
compiled model to qcompile (``calibrate``), not minutes later at the first compiled call.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import torch
from torch import nn

from qcompiler import recipes
from qcompiler.errors import OptionError
from qcompiler.lowering import get_lowering

BACKEND_OPTIONS = ("recipe", "target", "cuda_graphs")


def split_options(options: Optional[Mapping]) -> tuple:
    """options -> (Recipe, target name); unknown keys are an error listing the valid ones."""
    options = dict(options or {})
    target = options.pop("target", "auto")
    options.pop("cuda_graphs", None)  # a lowering option: qcompile_backend reads it
    fields = {f.name for f in dataclasses.fields(recipes.Recipe)} - {"name", "description"}
    unknown = sorted(set(options) - fields - {"recipe"})
    if unknown:
        raise OptionError(f"unknown qcompile option(s) {unknown}; valid options: "
                          f"{sorted(BACKEND_OPTIONS)} and the recipe fields {sorted(fields)}")
    return recipes.resolve(options), target


def compile_of(compiled) -> Optional[object]:
    """The ``_TorchCompileWrapper`` behind what ``torch.compile`` returned (a module or a function),
    or None: the key its graphs were registered under (``_calling_compile``)."""
    roots = [getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)]
    roots += [c.cell_contents for c in (getattr(compiled, "__closure__", None) or ()) if _has_cell(c)]
    seen, todo = set(), [(r, 0) for r in roots if r is not None]
    while todo:  # the wrapper sits a few attributes deep in Dynamo's callback chain
        obj, depth = todo.pop()
        if isinstance(obj, torch._TorchCompileWrapper):
            return obj
        if id(obj) in seen or depth > 5 or not hasattr(obj, "__dict__") or isinstance(obj, (nn.Module, type)):
            continue
        seen.add(id(obj))
        todo += [(v, depth + 1) for k, v in vars(obj).items() if not k.startswith("__") or k == "__wrapped__"]
    return None


def _has_cell(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True




def compile_options(compiled) -> Optional[dict]:
    """The options of the ``torch.compile(..., backend="qcompile")`` call behind ``compiled``
    (``{}`` when it gave none), or None when ``compiled`` is not a qcompile compile."""
    wrapper = compile_of(compiled)
    if wrapper is None or getattr(wrapper, "compiler_name", None) != "qcompile":
        return None
    return dict(wrapper.kwargs.get("options") or {})


def check_compile(compiled) -> None:
    """Raise ``OptionError`` now if ``compiled`` came from a qcompile compile whose options are wrong
    (an unknown recipe or option, a value a recipe cannot take, an unknown target)."""
    options = compile_options(compiled)
    if options is not None:
        _, target = split_options(options)
        if target != "auto":
            get_lowering(target)
