"""INT4 weight algorithms on SmolLM2-135M, compared fast: prepared weights applied eagerly.

Calibrates each options set with ``qcompiler.calibrate(model, data, recipe=...)`` (block by
block), then measures perplexity on 4 held-out 512-token windows with the prepared weights
swapped in through ``torch.func.functional_call`` (no compile), so algorithms can be compared in
minutes. ``benchmarks/accuracy.py`` measures the same recipes through the compiled path.

    python benchmarks/experiments/int4_eager.py CALIB_WINDOWS '[OPTIONS, ...]' [HELD_OUT_WINDOWS]
    python benchmarks/experiments/int4_eager.py 16 '[{"recipe": "w4a16-awq", "group_size": 64}]'
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
cal, held = zoo.lm_windows(ids, 512, int(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) > 3 else 4)
lin = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def ppl(params):
    return zoo.perplexity(model, held, params=params)


print("fp32", ppl({}), flush=True)
for opts in json.loads(sys.argv[2]):
    t = time.time()
    qcompiler.calibrate(model, cal.split(1), recipe=opts, progress=False)
    ct = time.time() - t
    params = {}
    for n, m in lin.items():
        p = prepared_for(m.weight)
        if p is None:  # round to nearest: nothing is prepared at calibration
            r = qcompiler.get_recipe(opts["recipe"]).replace(**{k: v for k, v in opts.items() if k != "recipe"})
            params[f"{n}.weight"] = int4.quantize(m.weight.detach(), r.group_size, r.symmetric).dequantize()
            continue
        w = p.weight.dequantize()
        params[f"{n}.weight"] = w / p.smooth_scale if p.smooth_scale is not None else w
    print(opts, ppl(params), f"{ct:.0f}s", flush=True)
