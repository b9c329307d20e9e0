"""One-token attention over a KV cache in ONNX Runtime: opset 23's ``Attention`` (what the ``ort``
target's decode graphs run, ``lowering/onnx_attention_cache.py``) against the contrib
``GroupQueryAttention``, whose CPU kernel also takes the past keys and values and returns the
present ones.

A session of 30 such layers (SmolLM2-135M's: 9 query heads, 3 key-value heads, head size 64, the
3-D inputs the fold writes, a past of ``--past`` tokens, each layer its own cache), on random
inputs; both sessions' outputs and present caches are compared first. Each round times every
session's calls back to back; the page gives the median of the rounds' medians, in ms per step
(30 layers).

    python benchmarks/experiments/decode_attention_ops.py [--past 32 90 256] [--rounds 5] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from results_page import write_page  # noqa: E402

Q_HEADS, KV_HEADS, HEAD, LAYERS = 9, 3, 64, 30


def _model(op: str) -> bytes:
    """``LAYERS`` one-token attention nodes of ``op`` ("Attention" or "GroupQueryAttention")."""
    from onnx import TensorProto as T
    from onnx import helper

    vi = helper.make_tensor_value_info
    inputs = [vi("q", T.FLOAT, [1, 1, Q_HEADS * HEAD])]
    if op == "GroupQueryAttention":
        inputs += [vi("seqlens_k", T.INT32, [1]), vi("total_length", T.INT32, [])]
    nodes, outputs = [], []
    for layer in range(LAYERS):
        k, v, pk, pv = (f"{n}{layer}" for n in ("k", "v", "past_k", "past_v"))
        inputs += [vi(k, T.FLOAT, [1, 1, KV_HEADS * HEAD]), vi(v, T.FLOAT, [1, 1, KV_HEADS * HEAD]),
                   vi(pk, T.FLOAT, [1, KV_HEADS, "past", HEAD]), vi(pv, T.FLOAT, [1, KV_HEADS, "past", HEAD])]
        out = [f"out{layer}", f"present_k{layer}", f"present_v{layer}"]
        if op == "Attention":
            nodes.append(helper.make_node("Attention", ["q", k, v, "", pk, pv], out, q_num_heads=Q_HEADS,
                                          kv_num_heads=KV_HEADS, is_causal=1))
        else:
            nodes.append(helper.make_node("GroupQueryAttention", ["q", k, v, pk, pv, "seqlens_k", "total_length"], out,
                                          domain="com.microsoft", num_heads=Q_HEADS, kv_num_heads=KV_HEADS))
        outputs += [vi(name, T.FLOAT, None) for name in out]
    opsets = [helper.make_opsetid("", 23)] + ([helper.make_opsetid("com.microsoft", 1)] if op != "Attention" else [])
    return helper.make_model(helper.make_graph(nodes, op, inputs, outputs), opset_imports=opsets).SerializeToString()


def _feeds(past: int, op: str) -> dict:
    import numpy as np

    rng = np.random.default_rng(past)
    feeds = {"q": rng.standard_normal((1, 1, Q_HEADS * HEAD), dtype=np.float32)}
    for layer in range(LAYERS):
        feeds[f"k{layer}"] = rng.standard_normal((1, 1, KV_HEADS * HEAD), dtype=np.float32)
        feeds[f"v{layer}"] = rng.standard_normal((1, 1, KV_HEADS * HEAD), dtype=np.float32)
        feeds[f"past_k{layer}"] = rng.standard_normal((1, KV_HEADS, past, HEAD), dtype=np.float32)
        feeds[f"past_v{layer}"] = rng.standard_normal((1, KV_HEADS, past, HEAD), dtype=np.float32)
    if op == "GroupQueryAttention":
        feeds["seqlens_k"] = np.array([past], dtype=np.int32)  # total length less one, per batch row
        feeds["total_length"] = np.array(past + 1, dtype=np.int32)
    return feeds


def _median_ms(session, feeds, calls: int) -> float:
    for _ in range(5):
        session.run(None, feeds)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None):
    import numpy as np

    from qcompiler.runtimes.ort_session import inference_session

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--past", type=int, nargs="+", default=[32, 90, 256])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    ops = ["Attention", "GroupQueryAttention"]
    sessions = {op: inference_session(_model(op), threads=args.threads) for op in ops}
    rows = []
    for past in args.past:
        feeds = {op: _feeds(past, op) for op in ops}
        outs = {op: sessions[op].run(None, feeds[op]) for op in ops}
        diff = max(float(np.abs(a - b).max()) for a, b in zip(*outs.values()))
        rounds = {op: [] for op in ops}
        for _ in range(args.rounds):
            for op in ops:
                rounds[op].append(_median_ms(sessions[op], feeds[op], args.calls))
        ms = {op: statistics.median(rounds[op]) for op in ops}
        rows.append(f"| {past} | {ms['Attention']:.3f} | {ms['GroupQueryAttention']:.3f} | "
                    f"{ms['GroupQueryAttention'] / ms['Attention']:.2f}x | {diff:.1e} |")
        print(rows[-1], flush=True)
    table = "\n".join(["| past tokens | Attention (opset 23) ms | GroupQueryAttention ms | GQA / Attention | "
                       "max abs difference (outputs, caches) |", "|---|---|---|---|---|", *rows])
    body = (__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip()
            + f"\n\n{args.threads} threads, {args.rounds} rounds of {args.calls} calls.\n\n" + table)
    if args.markdown:
        write_page(args.markdown, "One-token attention over a KV cache: Attention against GroupQueryAttention", body)


if __name__ == "__main__":
    main()
