"""GPTQ vs RTN per linear in the blocks where GPTQ lost to RTN (18, 13, 14): finds the v_proj layers.

Needs the weights saved by ``gptq_block_sensitivity.py``.

    python benchmarks/experiments/gptq_linear_sensitivity.py
"""
import torch
import os
from qcompiler.bundled import zoo
from qcompiler.ir import int4
GPTQ_WEIGHTS = os.path.join(os.environ.get("QCOMPILE_CACHE", ".cache"), "bench", "gptq_block_weights.pt")
torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, 4, 4)
G = torch.load(GPTQ_WEIGHTS)
mods = dict(model.named_modules())
def ppl(params):
    nll = 0
    with torch.no_grad():
        for w in held.split(1):
            lg = torch.func.functional_call(model, params, (w,), {"use_cache": False}, strict=False).logits
            nll += torch.nn.functional.cross_entropy(lg[0, :-1], w[0, 1:]).item()
    return float(torch.exp(torch.tensor(nll / len(held))))
base = ppl({})
for L in (18, 13, 14):
  for t in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
    n = f"model.layers.{L}.{t}"; w = mods[n].weight.detach()
    r = int4.quantize(w, 64, True).dequantize()
    print(n, f"rtn {ppl({n+'.weight': r})/base-1:+.4f} gptq {ppl({n+'.weight': G[n]})/base-1:+.4f}  max|dW| rtn {(r-w).abs().max():.3f} gptq {(G[n]-w).abs().max():.3f} absmax w {w.abs().max():.3f}", flush=True)
