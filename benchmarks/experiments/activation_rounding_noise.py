"""How much does SmolLM2's perplexity under dynamic 8-bit activations move when the float arithmetic
around the quantizers changes by one rounding?

Every linear but the tied ``lm_head`` runs qcompile's reference q-ops eagerly (per-channel weights,
per-token activations, INT8 or FP8); with ``--eps`` > 0 each linear's input is first multiplied by
``1 + eps * N(0, 1)`` (eps = 3e-7: the relative difference between two correct implementations
of the same layer, e.g. compressed-tensors' dequantize-then-matmul against qcompile's). The spread
of the printed perplexities over seeds is the noise floor of comparing two implementations of a
recipe by perplexity on these windows.

    python benchmarks/experiments/activation_rounding_noise.py --recipe fp8 --eps 3e-7 --seeds 1 2

``--layers`` measures the other half instead: SmolLM2 written by ``export_checkpoint`` and loaded by
transformers, every linear's output in that model's forward against qcompile's reference q-ops on
the same input (the largest relative difference over the 210 linears); for INT8 also against
qcompile's weights with the input rounded as compressed-tensors' reference code rounds it.
"""
import argparse

import torch

from qcompiler.bundled import zoo
from qcompiler.ir import ops


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=["w8a8", "fp8"], default="fp8")
    ap.add_argument("--eps", type=float, default=3e-7)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--windows", type=int, default=4, help="held-out 512-token windows")
    ap.add_argument("--layers", action="store_true", help="per-layer agreement with transformers instead")
    args = ap.parse_args()
    if args.layers:
        return layer_agreement(args)
    qdtype = ops.FP8 if args.recipe == "fp8" else torch.int8
    model, tok = zoo.load_smollm2()
    _, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 512, 16, args.windows)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    weights = {n: ops.quantize_per_channel_ref(m.weight.detach().float(), qdtype) for n, m in linears}
    for seed in [None] + args.seeds:
        gen = torch.Generator().manual_seed(seed or 0)
        for n, m in linears:
            def forward(x, wq=weights[n][0], ws=weights[n][1], bias=m.bias, noisy=seed is not None):
                if noisy:
                    x = x * (1 + args.eps * torch.randn(x.shape, generator=gen))
                xq, xs = ops.quantize_per_token_ref(x, None, qdtype)
                return ops.linear_w8a8_ref(xq, xs, wq, ws, bias, torch.float32)
            m.forward = forward
        with torch.no_grad():
            ppl = zoo.perplexity(model, held)
        print(f"{args.recipe}: " + ("exact inputs" if seed is None else f"eps {args.eps:g}, seed {seed}")
              + f": perplexity {ppl:.4f}", flush=True)


def layer_agreement(args) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM

    from qcompiler.deploy.checkpoint import export_checkpoint

    qdtype = ops.FP8 if args.recipe == "fp8" else torch.int8
    model, tok = zoo.load_smollm2()
    _, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 512, 16, 1)
    folder = tempfile.mkdtemp()
    export_checkpoint(model, folder, recipe=args.recipe)
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        loaded(input_ids=held[:1, :8])  # the first call decompresses the weights
    worst = []

    halves = []  # INT8: compressed-tensors' own activation rounding (scale amax / 127.5, clamped)

    def hook(name):
        def compare(module, inputs, out):
            wq, ws = ops.quantize_per_channel_ref(module.weight.detach().float(), qdtype)
            xq, xs = ops.quantize_per_token_ref(inputs[0], None, qdtype)
            ours = ops.linear_w8a8_ref(xq, xs, wq, ws, module.bias, torch.float32).double()
            worst.append((((ours - out.double()).norm() / out.double().norm()).item(), name))
            if qdtype == torch.int8:
                step = inputs[0].abs().amax(-1, keepdim=True) / 127.5
                theirs = ((inputs[0] / step).round().clamp(-128, 127) * step).double() @ \
                    (wq.double() * ws.double()[:, None]).t()
                halves.append((((theirs - out.double()).norm() / out.double().norm()).item(), name))
        return compare

    for name, m in loaded.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        loaded(input_ids=held[:1])
    err, name = max(worst)
    print(f"{args.recipe}: {len(worst)} linears; largest relative difference from qcompile's q-ops on the same "
          f"input: {err:.2e} ({name})")
    if halves:
        err, name = max(halves)
        print(f"{args.recipe}: with the input rounded as compressed-tensors rounds it (amax / 127.5, clamped) "
              f"instead: {err:.2e} ({name})")


if __name__ == "__main__":
    main()
