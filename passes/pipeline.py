"""The passes in their order, as one call: what the backend and the ONNX exporter both run.

``match`` -> ``smooth`` -> ``quantize`` (linears) -> ``embed`` (embedding tables) ->
``quantize_attention``; each returns its ``Decision``s, collected here in that order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from torch import fx, nn

from qcompiler.passes.attention import quantize_attention
from qcompiler.passes.attention_static import model_state
from qcompiler.passes.embedding import embed
from qcompiler.passes.match import match
from qcompiler.passes.quantize import quantize
from qcompiler.passes.smooth import smooth


@dataclass
class Rewritten:
    """What the passes did to one graph: a decision per linear / embedding / attention op, the
    weight Parameters of the matched linears (whose calibration state the graph depends on), and
    what ``match`` and ``smooth`` found ((node, LinearMatch, bias) triples; node -> ActivationPlan)."""

    decisions: list
    params: list
    matches: list
    plans: dict


def run_passes(gm: fx.GraphModule, example_inputs, recipe, replaced=None) -> Rewritten:
    """Rewrite ``gm`` in place for ``recipe``; ``replaced``: ``quantize``'s callback."""
    matches = match(gm, example_inputs, recipe)
    plans = smooth(gm, example_inputs, matches)
    decisions = embed(gm, example_inputs, recipe, quantize(gm, matches, plans, replaced))
    params = itertools.chain((m.param for _, m, _ in matches), (x for x in example_inputs if isinstance(x, nn.Parameter)))
    decisions += quantize_attention(gm, example_inputs, recipe, model_state(params))
    return Rewritten(decisions, [m.param for _, m, _ in matches], matches, plans)
