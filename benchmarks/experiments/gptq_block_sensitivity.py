"""GPTQ (act order, sym g64, FP-input Hessians from 32 windows) on SmolLM2-135M, one block at a time.

Perplexity on 4 held-out windows with only one block GPTQ-rounded, to compare with
``int4_block_sensitivity.py``; saves the rounded weights for ``gptq_linear_sensitivity.py``.

    python benchmarks/experiments/gptq_block_sensitivity.py
"""
import torch, sys
import os
from qcompiler.algorithms import gptq
from qcompiler.bundled import zoo
from qcompiler.ir import int4
GPTQ_WEIGHTS = os.path.join(os.environ.get("QCOMPILE_CACHE", ".cache"), "bench", "gptq_block_weights.pt")
torch.set_num_threads(1)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, 32, 4)
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
H = {}; T = [0]
def hook(n):
    def f(m, a):
        x = a[0].reshape(-1, a[0].shape[-1]).double()
        H[n] = H.get(n, 0) + x.t() @ x
    return f
hs = [m.register_forward_pre_hook(hook(n)) for n, m in lin.items() if n.endswith(("q_proj", "o_proj", "gate_proj", "down_proj"))]
with torch.no_grad():
    for w in cal.split(1): model(w, use_cache=False)
for h in hs: h.remove()
src = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
def hess(n):
    t = n.rsplit(".", 1)[1]; n2 = n.replace(t, src.get(t, t)); return (2 * H[n2] / (32 * 512)).float()
G = {n: gptq.gptq(m.weight.detach(), hess(n), 64, True, act_order=True).dequantize() for n, m in lin.items()}
print("gptq done", flush=True)
def ppl(params):
    nll = 0
    with torch.no_grad():
        for w in held.split(1):
            lg = torch.func.functional_call(model, params, (w,), {"use_cache": False}, strict=False).logits
            nll += torch.nn.functional.cross_entropy(lg[0, :-1], w[0, 1:]).item()
    return float(torch.exp(torch.tensor(nll / len(held))))
base = ppl({})
print("all gptq(fp inputs)", ppl({f"{n}.weight": w for n, w in G.items()})/base - 1, flush=True)
for L in range(30):
    only = {f"{n}.weight": w for n, w in G.items() if n.startswith(f"model.layers.{L}.")}
    print("layer", L, f"gptq only {ppl(only)/base-1:+.4f}", flush=True)
os.makedirs(os.path.dirname(GPTQ_WEIGHTS), exist_ok=True)
torch.save(G, GPTQ_WEIGHTS)
