"""Residual-stream rotation before INT4 rounding on SmolLM2-135M (a QuaRot-style experiment).

Folds every RMSNorm weight into the linears that read it (the output norm into an untied
lm_head), multiplies the residual stream by a random orthogonal matrix (seeded) folded into the
embedding, the readers (q/k/v/gate/up/lm_head) and the writers (o/down), checks FP32 perplexity is
unchanged, then calibrates and measures each options set as ``benchmarks/experiments/int4_eager.py`` does
(lm_head skipped). Measured: rotation makes RTN much worse (SmolLM2 weights sit on
GGUF Q4_1 grids that a rotation destroys) and GPTQ no better, so qcompile does not rotate.

    python benchmarks/experiments/int4_residual_rotation.py CALIB_WINDOWS '[OPTIONS, ...]' HELD_OUT_WINDOWS [rot|fold] [SEED]
    python benchmarks/experiments/int4_residual_rotation.py 16 '[{"recipe": "w4a16", "group_size": 64}]' 16 rot
"""
import json, sys, time
import torch
from qcompiler.bundled import zoo
from qcompiler.calibration.state import prepared_for
from qcompiler.ir import int4
import qcompiler
torch.set_num_threads(2)
model, tok = zoo.load_smollm2()
ids = zoo.wiki_token_ids(tok, "smollm2")
cal, held = zoo.lm_windows(ids, 512, int(sys.argv[1]), int(sys.argv[3]))
mode = sys.argv[4] if len(sys.argv) > 4 else "rot"

def ppl(params):
    return zoo.perplexity(model, held, params=params)

print("fp32", ppl({}), flush=True)
m = model.model
d = model.config.hidden_size
torch.manual_seed(int(sys.argv[5]) if len(sys.argv) > 5 else 0)
with torch.no_grad():
    # untie and fold norms
    E = m.embed_tokens.weight.detach().double()
    model.lm_head.weight = torch.nn.Parameter((model.lm_head.weight.detach().double() * m.norm.weight.double()).float())
    m.norm.weight.fill_(1.0)
    for L in m.layers:
        a, p = L.self_attn, L.mlp
        g = L.input_layernorm.weight.double()
        for lin in (a.q_proj, a.k_proj, a.v_proj):
            lin.weight.copy_((lin.weight.double() * g).float())
        L.input_layernorm.weight.fill_(1.0)
        g = L.post_attention_layernorm.weight.double()
        for lin in (p.gate_proj, p.up_proj):
            lin.weight.copy_((lin.weight.double() * g).float())
        L.post_attention_layernorm.weight.fill_(1.0)
    print("folded", ppl({}), flush=True)
    if mode == "rot":
        Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
        m.embed_tokens.weight = torch.nn.Parameter((E @ Q).float())
        model.lm_head.weight.copy_((model.lm_head.weight.double() @ Q).float())
        for L in m.layers:
            a, p = L.self_attn, L.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, p.gate_proj, p.up_proj):
                lin.weight.copy_((lin.weight.double() @ Q).float())
            for lin in (a.o_proj, p.down_proj):
                lin.weight.copy_((Q.t() @ lin.weight.double()).float())
        print("rotated", ppl({}), flush=True)
lin = {n: mm for n, mm in model.named_modules() if isinstance(mm, torch.nn.Linear) and n != "lm_head"}
for opts in json.loads(sys.argv[2]):
    opts = dict(opts, skip=["lm_head"])
    t = time.time()
    if opts["recipe"] != "w4a16":
        qcompiler.calibrate(model, cal.split(1), recipe=opts, progress=False)
    ct = time.time() - t
    params = {}
    for n, mm in lin.items():
        p = None if opts["recipe"] == "w4a16" else prepared_for(mm.weight)  # RTN: nothing prepared
        if p is None:
            r = qcompiler.get_recipe(opts["recipe"]).replace(**{k: v for k, v in opts.items() if k not in ("recipe", "skip")})
            params[f"{n}.weight"] = int4.quantize(mm.weight.detach(), r.group_size, r.symmetric).dequantize()
            continue
        w = p.weight.dequantize()
        params[f"{n}.weight"] = w / p.smooth_scale if p.smooth_scale is not None else w
    print(opts, ppl(params), f"{ct:.0f}s", flush=True)
