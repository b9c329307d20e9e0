"""Kernel plans for the triton lowering: each linear q-op of a graph runs the kernel measured fastest.

For every linear q-op node whose weights are graph constants, ``plan_graph`` asks the build's
``Chooser`` (``qcompiler.runtimes.kernel_choice``) for the kernel of each row count the node can
see: the graph's own M when its shapes are static, else one representative M per bucket of
``BUCKETS``. The node then calls ``qcompile_triton::planned_<op>``: the q-op's arguments, the
tensors the chosen kernels prepared once (a re-packed weight, stored on the graph module), and the
plan as two int lists (M upper bounds, kernel indices into the family's table). At run time the
op picks the entry for the call's M; no kernel choice happens in the hot path, and the plan
travels with the graph (no process-wide state). Nodes whose weights are not constants keep the
plain ``qcompile_triton::`` op, whose launchers choose by M.

``plan_graph`` returns the choices for ``explain``: (node name, Choice) pairs; ``speed_against_float``
sums them into the graph's measured speed against floating point (what ``target="auto"`` decides by).
"""
from __future__ import annotations

import math
import operator

import torch
from torch import fx

from qcompiler import torch_compat
from qcompiler.runtimes import kernel_choice, linear_kernels
from qcompiler.runtimes.kernel_choice import META_KEY

qops = torch.ops.qcompile

PREPARED_PREFIX = "_qc_prepared_"  # buffers of the graph module: what the chosen kernels prepared once
# (largest M, M measured for it): decode, small batches, mid-size batches, prefill
BUCKETS = ((1, 1), (16, 16), (256, 128), (2**62, 2048))


def _schema_args(name: str) -> str:
    schema = str(torch_compat.op_schema(getattr(qops, name).default))
    return schema[schema.index("(") + 1:schema.rindex(") ->")]


def _planned_impl(family):
    n_args = len(torch_compat.op_schema(getattr(qops, family.op).default).arguments)

    def run(*all_args):
        args, prepared, upper, kernels, start = all_args[:n_args], *all_args[n_args:]
        x = args[0]
        m = x.numel() // x.shape[-1] if x.shape[-1] else 0
        i = next((j for j, u in enumerate(upper) if m <= u), len(upper) - 1)
        nxt = start[i + 1] if i + 1 < len(start) else len(prepared)
        return family.kernels[kernels[i]].run(args, tuple(prepared[start[i]:nxt]))
    return run


def _register_planned(family):
    from qcompiler.ir import ops

    name = f"planned_{family.op}"
    schema = f"({_schema_args(family.op)}, Tensor[] prepared, int[] m_upper, int[] kernels, int[] prepared_start) -> Tensor"
    op = torch.library.custom_op(f"qcompile_triton::{name}", _planned_impl(family), mutates_args=(), schema=schema)
    fake = ops.FAKES[family.op]
    n_args = len(torch_compat.op_schema(getattr(qops, family.op).default).arguments)
    op.register_fake(lambda *a: fake(*a[:n_args]))
    return getattr(torch.ops.qcompile_triton, name).default


PLANNED = {getattr(qops, op).default: (family, _register_planned(family))
           for op, family in linear_kernels.FAMILIES.items()}


def _constant(gm: fx.GraphModule, arg, placeholders: dict):
    """A node argument's real value: a graph constant, a graph input's example, or the value itself."""
    if not isinstance(arg, fx.Node):
        return arg
    if arg.op == "get_attr":
        return operator.attrgetter(arg.target)(gm)
    if arg.op == "placeholder" and arg in placeholders and isinstance(placeholders[arg], torch.Tensor):
        return placeholders[arg]
    return None


def _call_args(family, node, gm, placeholders, vals, float_dtype):
    """The q-op's arguments with real weights and a 1-row stand-in activation; None when a weight
    is not a constant of the graph."""
    args = [_constant(gm, a, placeholders) for a in node.args]
    if family.op == "linear_w8a8":
        wq = args[2]
        if not isinstance(wq, torch.Tensor) or not isinstance(args[3], torch.Tensor):
            return None
        args[0] = torch.empty(1, wq.shape[1], dtype=wq.dtype, device=wq.device)
        if not isinstance(args[1], torch.Tensor):
            args[1] = torch.ones(2, 1, device=wq.device)  # a per-token scale (the activation's own)
    else:
        w = args[1]
        if not isinstance(w, torch.Tensor) or not isinstance(args[2], torch.Tensor):
            return None
        x_val = vals.get(node.args[0])
        dtype = x_val.dtype if isinstance(x_val, torch.Tensor) else float_dtype
        k = x_val.shape[-1] if isinstance(x_val, torch.Tensor) else (w.shape[1] * 2 if family.op == "linear_w4a16" else w.shape[1])
        args[0] = torch.empty(1, int(k), dtype=dtype, device=w.device)
    if any(a is None and isinstance(n, fx.Node) for a, n in zip(args[1:], node.args[1:])):
        return None  # an argument computed in the graph: no real value to measure with
    return tuple(args)


def _rows_of(val) -> object:
    """M of a call whose activation is ``val`` (an int, a SymInt, or None when unknown)."""
    if not isinstance(val, torch.Tensor):
        return None
    m = 1
    for d in val.shape[:-1]:
        m = m * d
    return m


def plan_graph(gm: fx.GraphModule, example_inputs, chooser: kernel_choice.Chooser) -> list:
    """Rewrite each linear q-op node to its planned op (module docstring); the choices made."""
    placeholders = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs))
    floats = [x.dtype for x in example_inputs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    float_dtype = floats[0] if floats else torch.float32
    vals = torch_compat.fake_values(gm, example_inputs)
    made, choices = {}, []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in PLANNED:
            continue
        family, planned = PLANNED[node.target]
        args = _call_args(family, node, gm, placeholders, vals, float_dtype)
        if args is None:
            continue
        m = _rows_of(vals.get(node.args[0]))
        buckets = [(m, m)] if isinstance(m, int) else list(BUCKETS)
        upper, kernels, start, prepared_nodes, node_choices = [], [], [], [], []
        for bound, rows in buckets:
            choice = chooser.choose(family, args, max(rows, 1))
            node_choices.append(choice)
            kernel = family.kernel(choice.kernel)
            start.append(len(prepared_nodes))
            if kernel.prepare is not None:
                # keyed by the prepare function: kernels sharing one layout share one copy
                key = (kernel.prepare, *(id(a) for a in args[1:] if isinstance(a, torch.Tensor)))
                if key not in made:
                    made[key] = []
                    for t in kernel.prepare(args):  # once per weight: buffers of the graph
                        made[key].append(f"{PREPARED_PREFIX}{sum(map(len, made.values()))}")
                        gm.register_buffer(made[key][-1], t)
                with gm.graph.inserting_before(node):
                    prepared_nodes += [gm.graph.get_attr(name) for name in made[key]]
            upper.append(bound if not isinstance(m, int) else BUCKETS[-1][0])  # static M: one entry for all
            kernels.append(family.index(choice.kernel))
        node.target = planned
        node.args = (*node.args, prepared_nodes, upper, kernels, start)
        node.meta[META_KEY] = node_choices
        choices += [(str(node.name), c) for c in node_choices]
    torch_compat.register_constant_sources(gm)
    gm.graph.lint()
    gm.recompile()
    return choices


def speed_against_float(choices: list) -> tuple:
    """``(ratio, text)``: how the graph's planned linears measured against the float linears of the
    same shapes. Per M bucket, the float linears' summed time over the kept kernels'; ``ratio`` is
    the geometric mean over the buckets (each bucket a kind of call: decode, small batch, prefill),
    None when a choice was not measured (no timer here) or the graph has no planned linear."""
    if not choices:
        return None, "the graph has no linear the triton target plans"
    if not all(c.measured and c.baseline_us and c.times_us.get(c.kernel) for _, c in choices):
        return None, "its kernels were not measured here"
    per_m = {}
    for _, c in choices:
        kept, base = per_m.get(c.m, (0.0, 0.0))
        per_m[c.m] = (kept + c.times_us[c.kernel], base + c.baseline_us)
    ratios = {m: base / kept for m, (kept, base) in sorted(per_m.items())}
    ratio = math.exp(sum(map(math.log, ratios.values())) / len(ratios))
    linears = len({name for name, _ in choices})
    text = (f"its {linears} linear(s) measured {ratio:.2f}x the float linears of the same shapes ("
            + ", ".join(f"M={m}: {r:.2f}x" for m, r in ratios.items()) + ")")
    return ratio, text


def drop_plans(gm: fx.GraphModule) -> None:
    """A planned graph that will not run (``target="auto"`` gave way to Inductor): its choices leave
    the nodes (``explain`` reads this graph) and its prepared weights become shape-only tensors on
    the meta device, so no re-packed copy of a weight stays in memory."""
    for node in gm.graph.nodes:
        node.meta.pop(META_KEY, None)
        node.meta.pop(kernel_choice.RUNS_KEY, None)
    for name, value in list(gm._buffers.items()):
        if name.startswith(PREPARED_PREFIX) and value is not None:
            gm._buffers[name] = torch.empty_like(value, device="meta")
