"""Model perplexity with GPTQ weights from FP-input Hessians (damp 0.01, 0.1) vs RTN, and with the block-wise pipeline's GPTQ weights (4 held-out windows).

A diagnostic whose output docs/experiments.md quotes (GPTQ analysis).

    python benchmarks/experiments/gptq_vs_rtn_eager.py
"""
import torch, time
from qcompiler.algorithms import gptq
from qcompiler.bundled import zoo
from qcompiler.calibration.state import prepared_for
from qcompiler.ir import int4
import qcompiler
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
print("fp", ppl({}))
print("rtn", ppl({f"{n}.weight": int4.quantize(m.weight.detach(), 64, True).dequantize() for n, m in lin.items()}))
# non-sequential GPTQ from FP inputs
xtx = {}
def hook(m, a, _n):
    x = a[0].reshape(-1, a[0].shape[-1]).float()
    s = xtx.setdefault(_n, [0, 0]); s[0] = s[0] + x.t() @ x; s[1] += x.shape[0]
hs = [m.register_forward_pre_hook(lambda m, a, _n=n: hook(m, a, _n)) for n, m in lin.items()]
with torch.no_grad():
    for w in cal.split(1): model(w, use_cache=False)
for h in hs: h.remove()
t = time.time()
for damp in (0.01, 0.1):
    params = {f"{n}.weight": gptq.gptq(m.weight.detach(), 2 * xtx[n][0] / xtx[n][1], 64, True, damp=damp).dequantize() for n, m in lin.items()}
    print("gptq fp-inputs damp", damp, ppl(params), time.time() - t)
qcompiler.calibrate(model, cal.split(1), recipe={"recipe": "w4a16-gptq", "group_size": 64}, progress=False)
print("gptq pipeline", ppl({f"{n}.weight": prepared_for(m.weight).weight.dequantize() for n, m in lin.items()}))
