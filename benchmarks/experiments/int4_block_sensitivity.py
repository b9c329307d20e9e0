"""Where INT4 round-to-nearest (sym g64) costs perplexity on SmolLM2-135M: per linear type and per block.

Perplexity on 4 held-out windows with only one type (or all but it) / one block quantized.
Quoted in the issue-5 closing note (layer 29 alone +13%).

    python benchmarks/experiments/int4_block_sensitivity.py
"""
import torch, re
from qcompiler.bundled import zoo
from qcompiler.ir import int4
torch.set_num_threads(1)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, 4, 4)
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
rtn = {n: int4.quantize(m.weight.detach(), 64, True).dequantize() for n, m in lin.items()}
def ppl(params):
    nll = 0
    with torch.no_grad():
        for w in held.split(1):
            lg = torch.func.functional_call(model, params, (w,), {"use_cache": False}, strict=False).logits
            nll += torch.nn.functional.cross_entropy(lg[0, :-1], w[0, 1:]).item()
    return float(torch.exp(torch.tensor(nll / len(held))))
base = ppl({}); print("fp32", base)
allp = {f"{n}.weight": w for n, w in rtn.items()}
print("all rtn", ppl(allp)/base-1)
for t in ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]:
    only = {f"{n}.weight": w for n, w in rtn.items() if n.endswith(t)}
    but = {f"{n}.weight": w for n, w in rtn.items() if not n.endswith(t)}
    print(t, f"only {ppl(only)/base-1:+.3f} all-but {ppl(but)/base-1:+.3f}", flush=True)
for L in range(30):
    only = {f"{n}.weight": w for n, w in rtn.items() if n.startswith(f"model.layers.{L}.")}
    print("layer", L, f"only {ppl(only)/base-1:+.4f}", flush=True)
