"""What a decode-step host rewrite of the ``ort`` target saves: SmolLM2-135M's one-token graph
with and without ``onnx_nan_carriers.drop_redundant_carriers`` (``REWRITES``: a rewrite to judge
is added there and to ``VARIANTS``).

The decode graph is compiled once without the rewrites (``onnx_fusions.HOST_FUSIONS`` without
them, and an empty export cache, which would otherwise hold the file with both), after a prompt of
``--cache`` tokens; the rewrites are then applied to copies of that file.
Each variant gets ``--copies`` sessions, made interleaved (a process's first-made session ran
slower in earlier measurements), and every round calls all sessions with the same inputs, in an
order reversed each round. Median milliseconds per run of ONNX Runtime's session, node count,
and the largest logit difference from the file without the rewrites.

    python benchmarks/experiments/decode_rewrites.py [--recipe w8a8-blocks] [--cache 100] [--rounds 30] [--markdown PAGE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cold_caches import cold_cache_env  # noqa: E402
from results_page import write_page  # noqa: E402

REWRITES = ["drop_redundant_carriers"]  # in HOST_FUSIONS' order
VARIANTS = {"neither": [], "carriers dropped (the target)": ["drop_redundant_carriers"]}


def decode_file(recipe: str, cache: int, threads: int):
    """(the decode graph's ONNX bytes without the rewrites, its inputs for one step)."""
    import torch

    from qcompiler.api.backend import compiled_graphs
    from qcompiler.bundled import zoo
    from qcompiler.lowering import onnx_fusions
    from qcompiler.runtimes import ort_session

    torch.set_num_threads(threads)
    onnx_fusions.HOST_FUSIONS["ort"] = [f for f in onnx_fusions.HOST_FUSIONS["ort"] if f.__name__ not in REWRITES]
    seen = {}
    call = ort_session.OrtSession.__call__

    def recording(self, *tensors):
        seen[id(self)] = [t.contiguous() for t in tensors]
        return call(self, *tensors)

    ort_session.OrtSession.__call__ = recording
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    _, held = zoo.lm_windows(ids, 256, 4, 4)
    fn = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": "ort"})
    with torch.no_grad():
        past = model(input_ids=held[:1, :cache], use_cache=True).past_key_values
        for _ in range(2):
            fn(input_ids=held[1:2, :1], past_key_values=past, use_cache=True)
            past.crop(-1)
    ort_session.OrtSession.__call__ = call
    session = [g for g in compiled_graphs(fn) if g.running_target == "ort"][-1].fn.session
    return session.model.SerializeToString(), seen[id(session)]


def variant(data: bytes, rewrites: list) -> bytes:
    import onnx
    import onnx_ir.passes.common as common_passes
    from onnxscript import ir

    from qcompiler.lowering import onnx_nan_carriers

    functions = {"drop_redundant_carriers": onnx_nan_carriers.drop_redundant_carriers}
    model = ir.serde.deserialize_model(onnx.load_from_string(data))
    for name in REWRITES:
        if name in rewrites:
            functions[name](model)
    common_passes.RemoveUnusedNodesPass()(model)
    return ir.serde.serialize_model(model).SerializeToString()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="w8a8-blocks")
    p.add_argument("--cache", type=int, default=100)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--copies", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    import onnx

    from qcompiler.runtimes.ort_session import OrtSession

    with tempfile.TemporaryDirectory() as root:
        os.environ.update(cold_cache_env(root, "decode_rewrites"))
        data, feeds = decode_file(args.recipe, args.cache, args.threads)
    files = {name: variant(data, rewrites) for name, rewrites in VARIANTS.items()}
    sessions = [(name, OrtSession(files[name], threads=args.threads)) for _ in range(args.copies) for name in VARIANTS]
    logits = {name: s(*feeds)[-1] for name, s in sessions[:len(VARIANTS)]}  # the logits are the last output
    for _, s in sessions:
        for _ in range(3):
            s(*feeds)
    times = [[] for _ in sessions]
    for r in range(args.rounds):
        order = list(range(len(sessions)))
        for i in (order if r % 2 else order[::-1]):
            t = time.perf_counter()
            sessions[i][1](*feeds)
            times[i].append(time.perf_counter() - t)
    rows = ["| variant | nodes | ms per run (median) | vs neither | max logit difference from neither |", "|---|---|---|---|---|"]
    med = {name: statistics.median([x for (n, _), ts in zip(sessions, times) if n == name for x in ts]) * 1e3
           for name in VARIANTS}
    for name in VARIANTS:
        nodes = len(onnx.load_from_string(files[name]).graph.node)
        diff = (logits[name] - logits["neither"]).abs().max().item()
        rows.append(f"| {name} | {nodes} | {med[name]:.2f} | {med['neither'] / med[name]:.3f}x | {diff:.3g} |")
        print(rows[-1], flush=True)
    body = (__doc__.split("\n\n", 1)[1].split("\n    python")[0].strip()
            + f"\n\n`{args.recipe}`, a cache of {args.cache} tokens, {args.threads} threads, {args.copies} sessions per "
            f"variant, {args.rounds} rounds.\n\n" + "\n".join(rows))
    if args.markdown:
        write_page(args.markdown, "Decode-step host rewrites of the ort target, with and without", body)


if __name__ == "__main__":
    main()
