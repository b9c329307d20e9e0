"""Experiment: GPTQ Hessians weighted per token by the loss gradient at each linear's output.

GPTQ minimises ``sum_t ||(W - Q) x_t||^2``: every token counts alike (but the first, which the
recipe's ``first_token_weight`` raises). What perplexity feels is ``sum_t g_t . (W - Q) x_t``
with ``g_t = dL/dy_t`` at the linear's output, whose second moment (Fisher, features taken as
isotropic) is ``sum_t ||g_t||^2 ((W - Q) x_t)^2``. This script measures that weighting: one
floating-point forward/backward per calibration window records ``||g_t||^2`` at every linear in
the blocks, then GPTQ runs block by block (``qcompiler.calibrate``) with each linear's Hessian
``sum_t w_t x_t x_t^T``, ``w_t = (||g_t||^2 / mean)^power``, per linear (q/k/v no longer share
one). Perplexity as ``benchmarks/experiments/int4_eager.py`` measures it.

    python benchmarks/experiments/int4_gradient_weights.py CALIB_WINDOWS HELD_OUT_WINDOWS '[OPTIONS, ...]' POWER [POWER ...]
    python benchmarks/experiments/int4_gradient_weights.py 16 16 '[{"recipe": "w4a16-gptq", "group_size": 64}]' 0 0.5 1

Power 0 is the plain recipe (token weights of 1) through the same per-linear code path.
"""
import json
import sys
import time

import torch

from qcompiler.bundled import zoo
from qcompiler.calibration import blockwise
from qcompiler.calibration.state import prepared_for
import qcompiler

torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, int(sys.argv[1]), int(sys.argv[2]))
blocks = blockwise.find_blocks(model)
lin = {}
for prefix, block in blocks:
    for n, m in block.named_modules():
        if isinstance(m, torch.nn.Linear):
            lin[m] = f"{prefix}.{n}"

# 1. ||dL/dy_t||^2 per linear, window, token (floating-point model)
t0 = time.time()
grad_sq = {name: [] for name in lin.values()}
handles = []


def hook(mod, args, out):
    name = lin[mod]
    out.register_hook(lambda g: grad_sq[name].append(g.detach().float().pow(2).sum(-1)[0]))


for m in lin:
    handles.append(m.register_forward_hook(hook))
for p in model.parameters():
    p.requires_grad_(False)
for w in cal.split(1):
    # parameters are frozen: the graph starts at the embeddings so the linears' outputs get gradients
    emb = model.get_input_embeddings()(w).detach().requires_grad_()
    logits = model(inputs_embeds=emb, use_cache=False).logits.float()
    torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:]).backward()
for h in handles:
    h.remove()
grad_sq = {n: torch.stack(v) for n, v in grad_sq.items()}   # [windows, T]
print(f"gradient pass {time.time() - t0:.0f}s", flush=True)

# 2. per-linear statistics with token weights
state = {"call": -1, "power": 0.0}
orig_update = blockwise.InputStats.update


def weighted_update(self, x):
    w = grad_sq[self.name][state["call"]]
    w = (w / w.mean()).pow(state["power"])
    return orig_update(self, x * w.sqrt()[None, :, None].to(x.dtype)) if state["power"] else orig_update(self, x)


def new_call(self):
    self._by_tensor = {}
    state["call"] = (state["call"] + 1) % len(cal)


def see(self, name, module, x):
    if name not in self.found:
        stats = blockwise.InputStats(x.shape[-1], self.need_hessian, self.max_rows, name, self.first_token_weight)
        self.found[name] = blockwise.LinearInput(name, module, stats, id(stats))
    self.found[name].inputs.update(x)


blockwise.InputStats.update = weighted_update
blockwise._Recorder.new_call = new_call
blockwise._Recorder._see = see


def ppl(params):
    return zoo.perplexity(model, held, params=params)


print("fp32", ppl({}), flush=True)
for opts in json.loads(sys.argv[3]):
    for power in map(float, sys.argv[4:]):
        state.update(call=-1, power=power)
        t = time.time()
        qcompiler.calibrate(model, cal.split(1), recipe=opts, progress=False)
        ct = time.time() - t
        params = {}
        for m, n in lin.items():
            p = prepared_for(m.weight)
            w = p.weight.dequantize()
            params[f"{n}.weight"] = w / p.smooth_scale if p.smooth_scale is not None else w
        print(opts, "power", power, ppl(params), f"{ct:.0f}s", flush=True)
