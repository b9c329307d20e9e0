"""Report: what the compiler did to each linear / attention op of a model, and how well.

``qcompiler.explain(compiled)`` reads back the ``Decision`` records the passes left on the graphs
of that compile (``explain(model)`` on the module itself: its most recent compile), says per graph
which target runs it and why when that is not the one asked for, and lists the model's linear
layers that no graph has reached yet (not compiled: the model was not called since compiling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from qcompiler.calibration.state import linear_layers, state_of
from qcompiler.passes.cache_read import META_KEY as KV_READ
from qcompiler.runtimes.kernel_choice import META_KEY as KERNELS_KEY, RUNS_KEY
from qcompiler.passes.meta import FALLBACKS, FLOATING_POINT, Decision

NOT_COMPILED = "not compiled"
# a quantized linear whose static activation scale loses more than this against per-token scales
# (its guard ``max_static_loss_db`` switched off or set higher) is named in a warning
WARN_STATIC_LOSS_DB = 10.0


def findings(decisions) -> list:
    """Lines naming the linears kept in floating point (grouped by why) and the quantized ones a
    static activation scale serves far worse than per-token scales would."""
    lines, kept, weights_only = [], {}, {}
    for d in decisions:
        if d.op == "linear" and d.scheme == FLOATING_POINT:
            kept.setdefault(FALLBACKS.get(d.fallback, d.reason), []).append(d.module)
        elif d.op == "linear" and d.weight_only:
            weights_only.setdefault(FALLBACKS.get(d.fallback, d.reason), []).append(d.module)
    for kind, modules in kept.items():
        lines.append(f"kept in floating point ({len(modules)}): {_names(modules)}: {kind}")
    for kind, modules in weights_only.items():
        lines.append(f"INT8 weights, activations kept in floating point ({len(modules)}): {_names(modules)}: {kind}")
    lossy = [d for d in decisions if d.scheme not in (FLOATING_POINT, NOT_COMPILED)
             and d.static_loss_db is not None and d.static_loss_db > WARN_STATIC_LOSS_DB]
    if lossy:
        worst = max(lossy, key=lambda d: d.static_loss_db)
        lines.append(f"warning: the static activation scales of {len(lossy)} linear(s) ({_names([d.module for d in lossy])}) "
                     f"lose up to {worst.static_loss_db:.1f} dB against per-token scales on the calibration data: "
                     f"set max_static_loss_db to keep them in floating point, or use the dynamic recipe 'w8a8'")
    return lines


def _names(modules: list, shown: int = 4) -> str:
    return ", ".join(modules[:shown]) + (f" and {len(modules) - shown} more" if len(modules) > shown else "")


@dataclass(frozen=True)
class GraphTarget:
    """Which target runs one compiled graph, and why (the fallback or the ``auto`` choice)."""

    requested: str
    running: str
    reason: str = ""


@dataclass
class Report:
    records: list = field(default_factory=list)
    graphs: list = field(default_factory=list)       # GraphTarget per compiled graph
    notes: list = field(default_factory=list)        # what the model's last calibration run estimated

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
        lines += findings(self.records)
        if not self.quantized_weight_bytes[0]:
            linears = [r for r in self.records if r.op == "linear"]
            lines.append("nothing was quantized: " + (
                "no linear layer was found" if not linears else
                "no compiled graph has run yet (call the compiled model)" if all(r.scheme == NOT_COMPILED for r in linears)
                else "every linear stays in floating point (reasons above)"))
        lines += self.notes
        for i, g in enumerate(self.graphs):
            asked = f" (asked: {g.requested})" if g.requested != g.running else ""
            lines.append(f"graph {i}: runs on {g.running}{asked}" + (f"; {g.reason}" if g.reason else ""))
        return "\n".join(lines)


def explain(model: nn.Module) -> Report:
    """One record per linear / attention op of ``model`` (compiled or not).

    Args:
        model: what ``torch.compile`` returned (that compile is described), or the module given to
            it (its most recent compile).

    Example:
        >>> fast = torch.compile(model, backend="qcompile"); fast(x)
        >>> print(qcompiler.explain(fast))
    """
    from qcompiler.api.backend import compiled_graphs

    graphs = compiled_graphs(model)
    model = getattr(model, "_orig_mod", model)
    records, seen = [], set()
    for graph in graphs:
        for node in graph.graph_module.graph.nodes:
            d = node.meta.get("qcompile")
            if isinstance(d, Decision) and (d.module, d.op, d.param_id) not in seen:
                seen.add((d.module, d.op, d.param_id))
                records.append(d)
    reached = {d.param_id for d in records}
    for name, mod in linear_layers(model):
        if id(mod.weight) not in reached:
            n, k = mod.weight.shape
            records.append(Decision(module=name, op="linear", scheme=NOT_COMPILED, reason="no compiled graph has reached it: not called since compiling, or run eagerly by Dynamo (e.g. next to a graph break)",
                                    weight_bytes_fp32=n * k * 4, param_id=id(mod.weight)))
    targets = [GraphTarget(g.requested, g.running_target,
                           "; ".join(r for r in (g.fallback_reason, g.auto_reason and f"auto passed over {g.auto_reason}",
                                                 getattr(g.fn, "note", ""), _float_note(g)) if r)) for g in graphs]
    return Report(records, targets, _run_notes(state_of(model).last_run) + _kv_notes(model) + _cache_read_notes(graphs)
                  + _kernel_notes(graphs) + _lifted_float_notes(graphs))


def _lifted_float_notes(graphs) -> list:
    """Graphs Dynamo passes Python floats as tensors at every call (``dynamic=True`` lifts the
    float arguments of a call to graph inputs; a module's float attributes, a norm's eps, are made
    constants by the backend), with the setting that keeps them guarded constants instead."""
    lines = []
    for i, g in enumerate(graphs):
        n = len(getattr(g, "scalar_slots", ()))
        if n:
            lines.append(f"Dynamo passes {n} Python float(s) (arguments of the call) to graph {i} as "
                         f"tensors at every call (dynamic=True); torch._dynamo.config.specialize_float = True before "
                         f"the first call keeps them guarded constants and shortens each call "
                         f"(docs/experiments.md, 'What is left of the Python')")
    return lines


def _kernel_notes(graphs) -> list:
    """Which kernel each linear of a triton-target graph runs, per M bucket, and how it measured
    against the float linear of the same shape (linears with the same choice counted together);
    for an ort-target graph, how many GEMMs of its sessions run each ONNX Runtime kernel."""
    lines = []
    for i, g in enumerate(graphs):
        counts = {}
        for n in g.graph_module.graph.nodes:
            choices = n.meta.get(KERNELS_KEY)
            if choices:
                d = n.meta.get("qcompile")
                op, runs = choices[0].op, n.meta.get(RUNS_KEY)
                label = f"{op} " + (f"runs {runs}; measured " if runs else "") + "; ".join(c.describe() for c in choices)
                counts.setdefault(label, []).append(d.module if isinstance(d, Decision) else n.name)
        for label, modules in counts.items():
            lines.append(f"graph {i}: {len(modules)} x {label}: {_names(modules)}")
        lines += [f"graph {i}: {line}" for line in getattr(g.fn, "kernel_lines", lambda: [])()]
    return lines


def _float_note(graph) -> str:
    calls = getattr(graph, "float_calls", 0)
    return "" if not calls else (
        f"{calls} call(s) ran the floating-point graph: the model was in training mode with gradients enabled "
        f"(quantization applies in eval mode or under torch.no_grad())")


def _kv_notes(model) -> list:
    from qcompiler.api.kv_cache import attached

    current = attached(model)
    if current is None:
        return []
    scheme, group, residual = current
    return [f"KV cache: {scheme}, keys per channel and values per token in groups of {group}, the last "
            f"{residual}+ tokens in floating point (generate()'s DynamicCache becomes a qcompiler.QuantizedKVCache)"]


def _cache_read_notes(graphs) -> list:
    """Which graphs' attention reads a quantized KV cache's codes in place (decode steps do; the
    prefill, whose cache holds no codes yet, does not)."""
    fused = {i: sum(KV_READ in n.meta for n in g.graph_module.graph.nodes) for i, g in enumerate(graphs)}
    fused = {i: count for i, count in fused.items() if count}
    if not fused:
        return []
    where = ", ".join(f"graph {i}: {count}" for i, count in fused.items())
    return [f"attention fused with the read of its quantized KV cache (qcompile::attention_quantized_kv): {where}"]


def _run_notes(run: dict) -> list:
    """The ``auto`` search's own estimate, with its uncertainty: it is measured on the held-out
    calibration batches, so text unlike them can land outside it."""
    if run.get("algorithm") != "auto" or "ppl_increase" not in run:
        return []
    se = run["ppl_increase_se"]
    se = "unknown with one batch" if math.isnan(se) else f"{100 * se:.2f}%"
    return [f"auto: estimated perplexity increase {100 * run['ppl_increase']:+.2f}% "
            f"(standard error {se}, {run['held_out_batches']} held-out calibration "
            f"batches; budget {100 * run['budget']:.1f}% at the estimate + {run['margin_se']:g} standard errors)"]
