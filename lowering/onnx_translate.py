"""One trace from a q-op graph to ONNX: ``torch.export``, then the exporter's translation directly.

``torch.onnx.export`` traces a module with ``torch.export``, then traces the program again under
its decomposition table (``run_decompositions``: functionalization and every op through fake
tensors once more; with symbolic batch and sequence sizes this second trace costs about three times
the first), then translates each op. A q-op graph rarely needs that second trace: every op of the
traced program usually has an ONNX translation already. ``export_program`` checks that op by op,
rewrites the few aliases the translation table lacks (``ALIASES``: ``aten.to.*`` as ``_to_copy``,
``__and__`` as ``bitwise_and``, Dynamo's in-place ``detach_`` as ``detach``; a reshape's ``-1`` as the size the trace knows, so the optimizer
sees the no-op reshapes the decomposition would have resolved) and hands the program to the
exporter's translation, its type-promotion pass run only where a node needs a cast
(``onnx_type_promotion``). Anything it cannot vouch for (a mutating op, a higher-order op, an op
without a translation, an exporter without the internals used here) goes through
``torch.onnx.export`` of the same traced program: one trace fewer than before either way.

The direct path uses the exporter's internal steps (``_core``, ``_fx_passes``, ``_registration``),
present in torch 2.11 to 2.13; where one is missing, ``internals()`` says so and the public path
runs.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import types
from typing import Callable, Optional, Sequence

import torch
from torch import fx

from qcompiler.lowering import onnx_type_promotion

log = logging.getLogger(__name__)
aten = torch.ops.aten

# (module, attribute) the direct path calls; all must exist or the public exporter runs
_INTERNALS = (
    ("torch.onnx._internal.exporter._core", "_exported_program_to_onnx_program"),
    ("torch.onnx._internal.exporter._fx_passes", "insert_type_promotion_nodes"),
    ("torch.onnx._internal.exporter._fx_passes", "remove_assertion_nodes"),
    ("torch.onnx._internal.exporter._registration", "ONNXRegistry"),
    ("torch.onnx._internal.exporter._ir_passes", "rename_inputs"),
    ("torch.onnx._internal.exporter._constants", "TORCHLIB_OPSET"),
    ("torch.onnx._internal.exporter._flags", "set_onnx_exporting_flag"),
    ("torch.onnx._internal._lazy_import", "onnxscript_apis"),
)

# checks the translation drops (the exporter's ``remove_assertion_nodes`` removes them)
_ASSERTIONS = frozenset({
    aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.default,
    aten._assert_async.msg, aten.sym_constrain_range_for_size.default,
})


def _as_copy(node: fx.Node) -> None:
    """``x.to(...)`` in any overload -> ``aten._to_copy(x, dtype=<the traced output's dtype>)``."""
    node.target = aten._to_copy.default
    node.kwargs = {"dtype": node.meta["val"].dtype}
    node.args = node.args[:1]


def _retarget(op) -> Callable[[fx.Node], None]:
    def rewrite(node: fx.Node) -> None:
        node.target = op
    return rewrite


# an op without an ONNX translation -> the rewrite into one with the same result (what the
# exporter's decomposition table would have made of it)
ALIASES: dict = {
    aten.to.dtype: _as_copy,
    aten.to.device: _as_copy,
    aten.to.dtype_layout: _as_copy,
    aten.to.other: _as_copy,
    aten.detach_.default: _retarget(aten.detach.default),  # autograd metadata only: the same values
    aten.__and__.Tensor: _retarget(aten.bitwise_and.Tensor),
    aten.__or__.Tensor: _retarget(aten.bitwise_or.Tensor),
    aten.__xor__.Tensor: _retarget(aten.bitwise_xor.Tensor),
}

_RESHAPES = frozenset({aten.reshape.default, aten.view.default})


@dataclasses.dataclass(frozen=True)
class Internals:
    """The exporter's steps the direct path calls (``steps.<attribute>``), and those missing."""
    steps: Optional[types.SimpleNamespace]
    missing: tuple


def internals() -> Internals:
    found, missing = {}, []
    for module_name, attribute in _INTERNALS:
        try:
            found[attribute] = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{attribute}")
    return Internals(types.SimpleNamespace(**found), tuple(missing))


def blockers(program: torch.export.ExportedProgram, registry) -> list:
    """Why ``program`` cannot be translated without the exporter's decomposition (empty: it can)."""
    found = []
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        found.append("mutates a buffer or an input")
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if target in _ASSERTIONS or target in ALIASES:
            continue
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            found.append(f"{target} (mutates its input)")
        elif not registry.is_registered(target):
            found.append(f"{target} (no ONNX translation)")
    return sorted(set(found))


def _resolve_minus_one(node: fx.Node) -> None:
    """A reshape's ``-1`` as the traced size when that size is a known integer."""
    shape, out = node.args[1], node.meta.get("val")
    if out is None or not isinstance(shape, (list, tuple)):
        return
    # compared as Python ints only: a symbolic size compared with -1 would add a guard
    i = next((k for k, s in enumerate(shape) if type(s) is int and s == -1), None)
    if i is not None and isinstance(out.shape[i], int):
        node.args = (node.args[0], [out.shape[i] if k == i else s for k, s in enumerate(shape)], *node.args[2:])


def rewrite_aliases(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in ALIASES:
            ALIASES[node.target](node)
        elif node.target in _RESHAPES:
            _resolve_minus_one(node)
    gm.recompile()


def registry_for(ex: Internals, opset: int, table: dict):
    """The exporter's registry as ``torch.onnx.export`` builds it, with ``table``'s translations."""
    registry = ex.steps.ONNXRegistry.from_torchlib(opset_version=max(opset, ex.steps.TORCHLIB_OPSET))
    for op, fn in table.items():
        registry.register_op(op, fn, is_complex=False)
    return registry


def capture(module, inputs: Sequence, kwargs: Optional[dict], dynamic_shapes) -> torch.export.ExportedProgram:
    """``torch.export`` as the exporter's first strategy calls it (non-strict, size-oblivious 0/1)."""
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        return torch.export.export(module, tuple(inputs), kwargs=kwargs, dynamic_shapes=dynamic_shapes,
                                   strict=False)


def export_program(program: torch.export.ExportedProgram, *, opset: int, table: dict,
                   input_names: Optional[Sequence[str]] = None):
    """``program`` as onnxscript's ``ir.Model`` at ``opset``, translated directly when nothing in it
    needs the exporter's decomposition, else through ``torch.onnx.export``."""
    ex = internals()
    reasons = list(ex.missing)
    registry = None
    if not reasons:
        registry = registry_for(ex, opset, table)
        reasons = blockers(program, registry)
    if reasons:
        log.info("ONNX export through torch.onnx.export's decomposition: %s", "; ".join(reasons))
        return torch.onnx.export(program, (), dynamo=True, opset_version=opset, custom_translation_table=table,
                                 input_names=list(input_names) if input_names else None, optimize=False,
                                 verbose=False, report=False).model
    return ex.steps.set_onnx_exporting_flag(_translate)(ex.steps, program, registry, opset, input_names)


def _translate(steps: types.SimpleNamespace, program, registry, opset: int, input_names):
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        gm = program.graph_module
        rewrite_aliases(gm)
        onnx_type_promotion.promote_types(gm, steps.insert_type_promotion_nodes)
        steps.remove_assertion_nodes(gm)
        model = steps._exported_program_to_onnx_program(program, registry=registry).model
    if model.opset_imports.get("") != opset:  # (at the registry's opset already: nothing to convert)
        model = steps.onnxscript_apis.convert_version(model, opset)
    if input_names:
        steps.rename_inputs(model, list(input_names))
    return model


__all__ = ["ALIASES", "blockers", "capture", "export_program", "internals"]
