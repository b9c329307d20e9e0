"""Quantization-aware training on qcompile's recipes: train the model the compiled q-ops compute.

    qcompiler.calibrate(model, batches, recipe="w4a16-gptq")      # optional: start from GPTQ / AWQ
    qcompiler.qat.prepare(model, recipe="w4a16-gptq")             # fake quantization, learned scales
    qcompiler.qat.blockwise(model, token_ids)                      # optional: block by block first
    qcompiler.qat.distill(model, token_ids, steps=200)            # or any loop / the HF Trainer
    qcompiler.qat.convert(model)                                  # trained codes -> quantization state
    fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq"})

``prepare`` (``qcompiler.qat.prepare``) swaps each linear the recipe quantizes for a ``QATLinear``
computing its scheme's numerics differentiably; ``blockwise`` (``qcompiler.qat.blockwise``) trains
the model's blocks one at a time against their float outputs; ``distill`` (``qcompiler.qat.distill``) trains it
against its own floating-point self; ``convert`` (``qcompiler.qat.convert``) writes the trained
codes and scales into the model's quantization state, which compiling, ``qcompiler.save``,
``export_onnx`` and ``export_checkpoint`` then use.
"""
from qcompiler.qat.blockwise import blockwise
from qcompiler.qat.convert import convert
from qcompiler.qat.distill import distill, teacher_samples, teaching
from qcompiler.qat.linear import QATLinear
from qcompiler.qat.prepare import prepare

__all__ = ["prepare", "blockwise", "convert", "distill", "teaching", "teacher_samples", "QATLinear"]
