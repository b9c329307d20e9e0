"""Explain: what the compiler did to each linear / attention op of a model, and how well.

``qcompiler.explain(model)`` reads back the ``Decision`` records the passes left on every graph
compiled from ``model`` (found through the model's parameters) and lists the model's linear
layers that no graph has reached yet (not compiled: the model was not called since compiling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from qcompiler.passes.meta import FLOATING_POINT, Decision

NOT_COMPILED = "not compiled"


@dataclass
class Report:
    records: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.records)

    def __len__(self):
        return len(self.records)

    def by_module(self, name: str) -> Decision:
        return next(r for r in self.records if r.module == name)

    @property
    def weight_bytes(self) -> tuple:
        """(FP32 bytes, bytes as compiled) over all compiled linear weights, scales included."""
        lin = [r for r in self.records if r.op == "linear" and r.scheme != NOT_COMPILED]
        return sum(r.weight_bytes_fp32 for r in lin), sum(r.weight_bytes_quantized for r in lin)

    @property
    def quantized_weight_bytes(self) -> tuple:
        """(FP32 bytes, bytes as compiled) over the linears that were quantized."""
        lin = [r for r in self.records if r.op == "linear" and r.scheme not in (NOT_COMPILED, FLOATING_POINT)]
        return sum(r.weight_bytes_fp32 for r in lin), sum(r.weight_bytes_quantized for r in lin)

    def __str__(self) -> str:
        head = ("module", "op", "scheme", "SQNR dB", "alpha", "clip", "reason / smoothing")
        rows = [head]
        for r in self.records:
            sq = "" if r.sqnr_db is None else ("inf" if math.isinf(r.sqnr_db) else f"{r.sqnr_db:.1f}")
            note = r.reason + (f"; scales {r.smoothing}" if r.smoothing else "")
            rows.append((r.module, r.op, r.scheme, sq, "" if r.alpha is None else f"{r.alpha:.2f}",
                         "" if r.clip is None else f"{r.clip:.2f}", note))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head) - 1)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows]
        for label, (fp32, q) in (("quantized linears", self.quantized_weight_bytes),
                                 ("all linear weights", self.weight_bytes)):
            if fp32:
                lines.append(f"{label}: {fp32 / 2**20:.1f} MiB FP32 -> {q / 2**20:.1f} MiB ({100 * q / fp32:.1f}%)")
        return "\n".join(lines)


def explain(model: nn.Module) -> Report:
    """One record per linear / attention op of ``model`` (compiled or not).

    Args:
        model: the module given to ``torch.compile`` or the compiled module it returned.

    Example:
        >>> fast = torch.compile(model, backend="qcompile"); fast(x)
        >>> print(qcompiler.explain(fast))
    """
    from qcompiler.backend import LIVE_GRAPHS

    model = getattr(model, "_orig_mod", model)
    param_ids = {id(p) for p in model.parameters()}
    records, seen = [], set()
    for graph in list(LIVE_GRAPHS):
        if not any(d.param_id in param_ids for d in graph.decisions):
            continue
        for node in graph.graph_module.graph.nodes:
            d = node.meta.get("qcompile")
            if isinstance(d, Decision) and (d.module, d.op, d.param_id) not in seen:
                seen.add((d.module, d.op, d.param_id))
                records.append(d)
    reached = {d.param_id for d in records}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and id(mod.weight) not in reached:
            n, k = mod.weight.shape
            records.append(Decision(name, "linear", NOT_COMPILED, "no compiled graph has reached it yet",
                                    weight_bytes_fp32=n * k * 4, param_id=id(mod.weight)))
    return Report(records)
