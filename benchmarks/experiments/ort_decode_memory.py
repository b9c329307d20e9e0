"""Decode through the ``ort`` target: seconds and peak memory of the first calls.

SmolLM2-135M, calibrated, compiled with ``{"recipe": "w8a8", "target": "ort"}``; three decode
steps of one token on a 256-token KV cache (the cache cropped back after each). Prints, per call,
its seconds, the process's peak RSS, the ONNX Runtime sessions and the compiled graphs.

    python benchmarks/experiments/ort_decode_memory.py
"""
import resource
import time

import torch

import qcompiler
from qcompiler.api.backend import compiled_graphs
from qcompiler.bundled import zoo
from qcompiler.lowering import ort


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main():
    lm, tok = zoo.load_smollm2()
    calib, held = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 256, 4, 4)
    qcompiler.calibrate(lm, [{"input_ids": w[None]} for w in calib], progress=False)
    with torch.no_grad():
        past = lm(input_ids=held[:1], use_cache=True).past_key_values
    print(f"before compiling: peak RSS {peak_gb():.2f} GB")
    fn = torch.compile(lm, backend="qcompile", options={"recipe": "w8a8", "target": "ort"})
    for i in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            fn(input_ids=held[1:2, :1], past_key_values=past, use_cache=True)
        past.crop(-1)
        print(f"call {i}: {time.perf_counter() - t:.1f} s, peak RSS {peak_gb():.2f} GB, "
              f"{len(ort._SESSIONS)} sessions, {len(compiled_graphs(fn))} graphs")


if __name__ == "__main__":
    main()
