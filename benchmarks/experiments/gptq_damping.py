"""GPTQ dampening (0.01/0.1/0.3) and act order on three SmolLM2 layers: output error on calibration vs held-out rows (32 calibration windows).

A diagnostic whose output docs/experiments.md quotes (GPTQ analysis).

    python benchmarks/experiments/gptq_damping.py
"""
import torch
from qcompiler.algorithms import gptq
from qcompiler.bundled import zoo
from qcompiler.ir import int4
torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, 32, 4)
names = ["model.layers.5.mlp.down_proj", "model.layers.20.mlp.down_proj", "model.layers.10.self_attn.o_proj"]
mods = dict(model.named_modules())
def grab(data):
    xs = {}
    hs = [mods[n].register_forward_pre_hook(lambda m, a, _n=n: xs.setdefault(_n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for w in data.split(1): model(w, use_cache=False)
    for h in hs: h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}
xc, xh = grab(cal), grab(held)
for n in names:
    w = mods[n].weight.detach()
    x = xc[n]; h = 2 * x.t() @ x / x.shape[0]
    def err(x, wh):
        y = x @ w.t(); return ((x @ wh.t() - y).pow(2).sum() / y.pow(2).sum()).item()
    r = int4.quantize(w, 64, True).dequantize()
    print(n, f"rtn calib {err(x, r):.2e} held {err(xh[n], r):.2e}")
    for damp in (0.01, 0.1, 0.3):
        for ao in (False, True):
            g = gptq.gptq(w, h, 64, True, damp=damp, act_order=ao).dequantize()
            print(f"   damp {damp} ao {ao}: calib {err(x, g):.2e} held {err(xh[n], g):.2e}")
