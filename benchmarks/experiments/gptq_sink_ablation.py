"""GPTQ with Hessians that leave out each window's first (attention-sink) token, and with act order (4 held-out windows).

A diagnostic whose output docs/experiments.md quotes (GPTQ analysis).

    python benchmarks/experiments/gptq_sink_ablation.py
"""
import torch, time
from qcompiler.algorithms import gptq
from qcompiler.bundled import zoo
from qcompiler.ir import int4
torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, 16, 4)
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
def ppl(params):
    nll = 0
    with torch.no_grad():
        for w in held.split(1):
            lg = torch.func.functional_call(model, params, (w,), {"use_cache": False}, strict=False).logits
            nll += torch.nn.functional.cross_entropy(lg[0, :-1], w[0, 1:]).item()
    return float(torch.exp(torch.tensor(nll / len(held))))
xtx, xtx1 = {}, {}
def hook(m, a, _n):
    x = a[0].reshape(-1, a[0].shape[-1]).float()
    s = xtx.setdefault(_n, [0, 0]); s[0] = s[0] + x.t() @ x; s[1] += x.shape[0]
    x = a[0][:, 1:].reshape(-1, a[0].shape[-1]).float()
    s = xtx1.setdefault(_n, [0, 0]); s[0] = s[0] + x.t() @ x; s[1] += x.shape[0]
    print(_n, a[0][0, 0].abs().max().item(), a[0][0, 1:].abs().max().item()) if _n.endswith("layers.3.mlp.down_proj") else None
hs = [m.register_forward_pre_hook(lambda m, a, _n=n: hook(m, a, _n)) for n, m in lin.items()]
with torch.no_grad():
    for w in cal.split(1)[:2]: model(w, use_cache=False)
    for w in cal.split(1)[2:]: model(w, use_cache=False)
for h in hs: h.remove()
for label, H, ao in (("no pos0", xtx1, False), ("act_order", xtx, True), ("no pos0 + act_order", xtx1, True)):
    params = {f"{n}.weight": gptq.gptq(m.weight.detach(), 2 * H[n][0] / H[n][1], 64, True, act_order=ao).dequantize() for n, m in lin.items()}
    print(label, ppl(params), flush=True)
