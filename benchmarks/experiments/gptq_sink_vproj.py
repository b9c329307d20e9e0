"""GPTQ vs round-to-nearest on single v_proj layers of SmolLM2-135M: the attention-sink weighting.

Perplexity (4 held-out windows) with one v_proj replaced: RTN sym g64, GPTQ (act order) at
dampening 0.01 / 0.1 / 1.0, and GPTQ with each window's first token weighted x64 / x512 in the
Hessian (32 calibration windows, FP inputs). docs/experiments.md quotes it (GPTQ analysis).

    python benchmarks/experiments/gptq_sink_vproj.py
"""
import torch
from qcompiler.algorithms import gptq
from qcompiler.bundled import zoo
from qcompiler.ir import int4
torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, 32, 4)
mods = dict(model.named_modules())
Ls = (18, 13, 14)
X = {L: [] for L in Ls}
hs = [mods[f"model.layers.{L}.self_attn.v_proj"].register_forward_pre_hook(lambda m, a, _L=L: X[_L].append(a[0].reshape(-1, a[0].shape[-1]).double())) for L in Ls]
with torch.no_grad():
    for w in cal.split(1): model(w, use_cache=False)
for h in hs: h.remove()
def ppl(params):
    nll = 0
    with torch.no_grad():
        for w in held.split(1):
            lg = torch.func.functional_call(model, params, (w,), {"use_cache": False}, strict=False).logits
            nll += torch.nn.functional.cross_entropy(lg[0, :-1], w[0, 1:]).item()
    return float(torch.exp(torch.tensor(nll / len(held))))
base = ppl({})
for L in Ls:
    n = f"model.layers.{L}.self_attn.v_proj"; w = mods[n].weight.detach(); x = torch.cat(X[L])
    res = {"rtn": int4.quantize(w, 64, True).dequantize()}
    for w0 in (1, 64, 512):
        wt = torch.ones(len(x), dtype=torch.float64); wt[::512] = w0
        h = (2 * (x * wt[:, None]).t() @ x / len(x)).float()
        for d in ((0.01, 0.1, 1.0) if w0 == 1 else (0.01,)):
            res[f"w0={w0} damp={d}"] = gptq.gptq(w, h, 64, True, damp=d, act_order=True).dequantize()
    print(n, " ".join(f"{k}: {ppl({n+'.weight': v})/base-1:+.4f}" for k, v in res.items()), flush=True)
