"""Do the targets compute the same quantized model? SmolLM2-135M under ``w8a8`` through the
reference, inductor and ort targets, against the spread that float32 rounding alone causes.

The ``w8a8`` model is hypersensitive to tiny float differences: SmolLM2's embedding rows sit on
GGUF's 4-bit grid, so a few first-layer activations fall exactly on INT8 rounding ties, and a tie
broken the other way in an early position reaches every later position through attention. The
targets' float ops (Inductor's fused kernels, ONNX Runtime's fused norms and attention) round
differently from eager torch at the 1e-7 level, so their perplexities differ for that reason alone.
This script measures both: each target's perplexity, and the reference target's perplexity with
the embedding table multiplied by (1 + 1e-7 N(0, 1)) under a few seeds (a change the size of a
float32 rounding). Also the count of first-layer activation ties (|x / scale - (n + 1/2)| < 1e-5).

    python benchmarks/target_agreement.py [--seeds 3] [--windows 4] [--targets reference inductor ort]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from qcompiler.bundled import zoo
from qcompiler.ir import ops


def ties_in_first_layer(lm, ids: torch.Tensor) -> tuple:
    """(ties, elements) of the per-token-quantized input of the first layer's q projection."""
    seen = {}
    proj = lm.model.layers[0].self_attn.q_proj
    handle = proj.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0].detach()))
    with torch.no_grad():
        lm(input_ids=ids, use_cache=False)
    handle.remove()
    x = seen["x"].float()
    ratio = x / ops.scale_from_amax(x.abs().amax(-1, keepdim=True))
    return int(((ratio - ratio.floor() - 0.5).abs() < 1e-5).sum()), x.numel()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--windows", type=int, default=4, help="held-out 256-token windows (cpu_speed.py: 4)")
    p.add_argument("--targets", nargs="+", default=["reference", "inductor", "ort"])
    args = p.parse_args(argv)
    lm, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")
    _, held = zoo.lm_windows(ids, 256, 4, args.windows)  # 4: benchmarks/cpu_speed.py's held-out windows
    with torch.no_grad():
        base = zoo.perplexity(lm, held)
    ties, n = ties_in_first_layer(lm, held)
    print(f"{len(held)} held-out windows of 256 tokens")
    print(f"first-layer q_proj input: {ties} of {n} activations on an INT8 rounding tie (within 1e-5)")
    print(f"{'w8a8 through':44} {'ppl':>9} {'vs FP32':>9}")
    print(f"{'(FP32 eager)':44} {base:9.4f}")
    rows = {}
    for target in args.targets:
        fn = torch.compile(lm, backend="qcompile", options={"recipe": "w8a8", "target": target})
        with torch.no_grad():
            rows[target] = zoo.perplexity(fn, held)
        print(f"{target:44} {rows[target]:9.4f} {100 * (rows[target] / base - 1):+8.3f}%", flush=True)
        if target != "reference":
            torch._dynamo.reset()
    fn = torch.compile(lm, backend="qcompile", options={"recipe": "w8a8", "target": "reference"})
    emb = lm.model.embed_tokens.weight
    original = emb.detach().clone()
    perturbed = []
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            emb.mul_(1 + 1e-7 * torch.randn(emb.shape, generator=gen))
            perturbed.append(zoo.perplexity(fn, held))
            emb.copy_(original)
        print(f"{f'reference, embedding x (1 + 1e-7 N), seed {seed}':44} {perturbed[-1]:9.4f} "
              f"{100 * (perturbed[-1] / base - 1):+8.3f}%", flush=True)
    spread = [100 * (v / base - 1) for v in perturbed + ([rows["reference"]] if "reference" in rows else [])]
    print(f"reference under 1e-7 perturbations: {min(spread):+.3f}% .. {max(spread):+.3f}% "
          f"(stdev {statistics.stdev(spread):.3f} points); targets: "
          + ", ".join(f"{t} {100 * (v / base - 1):+.3f}%" for t, v in rows.items()))


if __name__ == "__main__":
    main()
