"""The fresh-process half of the saved-state round trip (run by tests/integration/test_artifacts.py).

    python tests/artifact_roundtrip.py FOLDER CASE...

For each case ``recipe@target`` (or ``recipe:field=value@target``, one more recipe field) it
builds the same tiny Llama as the test (same seed), loads ``FOLDER/<recipe>`` into it, compiles it
with ``options={"recipe": recipe, "target": target[, field: value]}`` without calibrating, and writes its logits on the test's batch to ``FOLDER/<recipe>@<target>.out``
(safetensors), for the test to compare bit for bit with the output before saving.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qcompiler  # noqa: E402
from tiny_models import build, token_batch  # noqa: E402

SEED, BATCH = 0, dict(batch=2, length=12, seed=9)


def parse(case: str) -> tuple:
    """``recipe[:field=value]@target`` -> (recipe, target, extra options)."""
    spec, target = case.split("@")
    recipe, _, extra = spec.partition(":")
    return recipe, target, dict([extra.split("=")]) if extra else {}


def logits(model, recipe: str, target: str, **extra) -> torch.Tensor:
    fast = torch.compile(model, backend="qcompile", options={"recipe": recipe, "target": target, **extra})
    vocab = model.config.vocab_size
    with torch.no_grad():
        return fast(**token_batch(vocab, **BATCH)).logits.contiguous()


def main(folder: str, cases: list) -> None:
    for case in cases:
        recipe, target, extra = parse(case)
        torch._dynamo.reset()
        model, _ = build("llama", seed=SEED)
        qcompiler.load(model, os.path.join(folder, recipe))
        save_file({"logits": logits(model, recipe, target, **extra)}, os.path.join(folder, f"{case}.out"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
