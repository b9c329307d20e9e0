"""Where a calibrated INT4 recipe still loses perplexity on SmolLM2-135M: per linear type and per block.

Calibrates the options set as ``qcompiler.calibrate`` does, then measures perplexity on 4 held-out
512-token windows with every prepared weight applied, and with one linear type (or one block) put
back in floating point ("all but"): the share of the gap each one carries.

    python benchmarks/experiments/int4_recipe_sensitivity.py 16 '{"recipe": "w4a16-awq", "group_size": 64}'
"""
import json
import sys
import time

import torch

from qcompiler.bundled import zoo
from qcompiler.calibration.state import prepared_for
from qcompiler.ir import int4
import qcompiler

torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, int(sys.argv[1]), 4)
opts = json.loads(sys.argv[2])
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def ppl(params):
    return zoo.perplexity(model, held, params=params)


def effective(n, m):
    p = prepared_for(m.weight)
    if p is None or p.weight is None:
        r = qcompiler.get_recipe(opts["recipe"]).replace(**{k: v for k, v in opts.items() if k != "recipe"})
        return int4.quantize(m.weight.detach(), r.group_size, r.symmetric).dequantize()
    w = p.weight.dequantize()
    return w / p.smooth_scale if p.smooth_scale is not None else w


base = ppl({})
print(f"fp32 {base:.4f}", flush=True)
t = time.time()
if opts["recipe"] != "w4a16":
    qcompiler.calibrate(model, cal.split(1), recipe=opts, progress=False)
print(f"calibration {time.time() - t:.0f}s", flush=True)
quant = {f"{n}.weight": effective(n, m) for n, m in lin.items()}
full = ppl(quant)
print(f"all quantized {full:.4f} {full / base - 1:+.4f}", flush=True)
types = sorted({n.rsplit(".", 1)[1] for n in lin})
for t in types:
    but = {k: v for k, v in quant.items() if not k.endswith(f"{t}.weight")}
    print(f"all but {t:10s} {ppl(but) / base - 1:+.4f}", flush=True)
for b in range(len(model.model.layers)):
    but = {k: v for k, v in quant.items() if not k.startswith(f"model.layers.{b}.")}
    print(f"all but block {b:2d} {ppl(but) / base - 1:+.4f}", flush=True)
