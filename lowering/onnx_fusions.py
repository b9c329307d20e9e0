"""Rewrites of an exported ONNX graph into ops the target's runtime runs faster, per form.

``lowering.onnx.to_onnx`` runs ``optimize``: onnxscript's graph optimizer (constant folding,
its no-op and shape rewrites, dead code, common subexpressions), then ``FUSIONS[form]``, before it
stores constants. The optimizer's steps are those of ``onnxscript.optimizer.optimize_ir`` less one
rule: ``SlicesSplit`` is a two-output pattern, which onnxscript matches by trying every pair of
``Slice`` nodes, and it took 37 of a 41-second optimization of SmolLM2's graph (about 9000 nodes)
for no rewrite (docs/experiments.md, "Compile time and memory of ``generate()`` on the CPU"). The exporter's own
``optimize=True`` would also apply onnxscript's opset-23 fusions, among them ``RotaryEmbedding``,
whose cos/sin caches keep the batch size 1 of ``position_ids``: ONNX Runtime 1.32 rejects the
fused node for any batch above 1 (tests/integration/test_architectures.py). Only its RMSNormalization fusion
is kept here; ``lowering.onnx_rotary`` fuses RoPE with the model's own per-row tables instead. Each rule is an ``onnxscript`` rewrite rule that replaces a subgraph by one op computing
the same values, so none changes what the model computes: a table entry is a speed decision.

* ``GRAPH_FUSIONS``: rewrites a pattern rule cannot state, such as ``merge_sibling_matmuls``
  (``ort``): the integer GEMMs that read one quantized activation become one; ``fuse_rotary``
  (``ort``): RoPE's six ops per query and key tensor become one ``RotaryEmbedding``;
  ``fold_attention_heads`` (``ort``): the head splits and merge around a 4-D ``Attention`` (in a
  decoder with RoPE and the cache's ``Concat``) become the 3-D op, with the past keys and values
  as its inputs; ONNX Runtime's CPU kernel then skips the transposes (benchmarks/ort_profile.py).
"""
from __future__ import annotations

import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding
from onnxscript import ir, rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import slice_split_rule
from onnxscript.rewriter.rules.fusion import _rms_normalization

from qcompiler.lowering.onnx_attention_cache import fold_attention_heads
from qcompiler.lowering.onnx_decode_gemv import few_row_gemvs
from qcompiler.lowering.onnx_nan_carriers import drop_redundant_carriers
from qcompiler.lowering.onnx_rule_filter import RewriteWherePossible
from qcompiler.lowering.onnx_rotary import fuse_rotary
from qcompiler.lowering.onnx_signed_weights import signed_int8_weights
from qcompiler.lowering.onnx_sibling_matmuls import merge_sibling_matmuls
from qcompiler.lowering.onnx_weight_only_int8 import two_pass_weight_only_int8


FUSIONS = {
    "ort": [],  # the attention rewrite is a graph fusion: RoPE and the cache sit inside its pattern
    "tensorrt": [],  # opset 21 has no Attention op; TensorRT does its own fusions
}
# onnxscript's own fusions applied per form (opset 23 only: the ort form)
LIBRARY_FUSIONS = {
    "ort": [_rms_normalization.fuse_rms_normalization],
    "tensorrt": [],
}


# whole-graph rewrites per form, after the rules (each returns how many nodes it removed)
GRAPH_FUSIONS = {
    "ort": [merge_sibling_matmuls, fuse_rotary, fold_attention_heads],
    "tensorrt": [],
}


# rewrites for the CPU the session runs on, after the graph fusions: applied to the ``ort`` target's
# own sessions (``optimize(..., host=True)``), never to a file exported for deployment elsewhere
HOST_FUSIONS = {
    "ort": [few_row_gemvs, two_pass_weight_only_int8, drop_redundant_carriers, signed_int8_weights],
    "tensorrt": [],
}


def fuse(model: ir.Model, form: str) -> int:
    """Apply ``FUSIONS[form]`` to ``model`` in place; returns how many rewrites it made."""
    rules = FUSIONS[form]
    return pattern.RewriteRuleSet(rules).apply_to_model(model) if rules else 0


# onnxscript's default rewrites less the quadratic two-output rule (this table and
# ``_constant_folding`` are private to the library: a release that renames them fails this import,
# and tests/unit/test_onnx.py checks the result against ``optimize_ir``'s own)
REWRITES = [rule for rule in rewriter._DEFAULT_REWRITE_RULES if rule is not slice_split_rule]
OPTIMIZER_ROUNDS = 2  # optimize_ir's default: fold and rewrite, twice unless nothing changed


# ops whose all-constant results are stored whatever their size: the weight layout changes the
# translations write as ONNX ops (transposes, INT4 nibbles packed with bit ops), which onnxscript's
# default folding leaves alone above its input size limit
LAYOUT_OPS = {"BitwiseAnd", "BitwiseOr", "BitShift", "Unsqueeze", "Squeeze", "Concat", "Reshape", "Slice",
              "Cast", "Sub", "Add", "Transpose", "Pad", "Constant"}
# a constant cast to float is a dequantization, which the file must not store expanded
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
_INT8_TYPES = {ir.DataType.INT8, ir.DataType.UINT8}


def _fold_layout(node: ir.Node):
    """True (fold, any size) for a ``LAYOUT_OPS`` node, except a cast to float; False for a cast of
    8-bit integers to float (a dequantized weight stays INT8 in the file, whatever its size, and the
    host rewrites can find its codes); None (onnxscript's default rules: small constants only) for
    every other node."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in LAYOUT_OPS:
        return None
    to = node.attributes.get("to")
    if node.op_type == "Cast" and to is not None and ir.DataType(to.as_int()) in _FLOAT_TYPES:
        source = node.inputs[0].dtype if node.inputs and node.inputs[0] is not None else None
        return False if source in _INT8_TYPES else None
    return True


def _optimizer() -> ir.passes.Sequential:
    """``optimize_ir``'s passes with ``REWRITES`` as the rewrite rules, layout ops on constants
    folded whatever their size (in the IR, where the weights are the exporter's tensors: folding
    after serialization held every weight twice, 1.3 GB more for SmolLM2)."""
    loop = ir.passes.PassManager([
        _constant_folding.FoldConstantsPass(
            shape_inference=True, input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT, should_fold=_fold_layout),
        RewriteWherePossible(REWRITES),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.RemoveUnusedFunctionsPass(),
        common_passes.RemoveUnusedOpsetsPass(),
    ], steps=OPTIMIZER_ROUNDS, early_stop=True)
    return ir.passes.Sequential(
        common_passes.InlinePass(), loop, common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(), common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(), common_passes.OutputFixPass(),
        common_passes.NameFixPass())


def optimize(model: ir.Model, form: str, host: bool = False) -> int:
    """onnxscript's optimizer, then the form's library fusions, ``fuse``, the graph fusions and,
    with ``host``, the fusions for this machine's CPU; returns the rewrite count."""
    try:
        _optimizer()(model)
        count = sum(f(model) for f in LIBRARY_FUSIONS[form]) + fuse(model, form)
        merged = sum(f(model) for f in GRAPH_FUSIONS[form] + (HOST_FUSIONS[form] if host else []))
    finally:
        forget_matches(MATCHING_RULES)
    if merged:  # the rewritten nodes' own weights are no longer read
        common_passes.RemoveUnusedNodesPass()(model)
    return count + merged


# every pattern rule ``optimize`` applies (they live as long as the process: ``forget_matches``)
MATCHING_RULES = [*REWRITES, *(rule for rules in FUSIONS.values() for rule in rules),
                  *_rms_normalization.rms_normalization_rules]


def forget_matches(rules) -> None:
    """Drop the last match each rule's matcher keeps. onnxscript's matcher holds the graph it last
    matched, its last node and match (``_graph``, ``_current_node``, ``_match``) on the rule
    object, and these rules are module constants: the exported graph, with every weight the
    exporter copied, would outlive the export."""
    for rule in rules:
        matcher = getattr(rule, "_matcher", None)
        for attribute in ("_graph", "_current_node", "_tracer"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)
        if hasattr(matcher, "_match"):
            matcher._match = type(matcher._match)()
