"""Calibrate once, then start fresh: GPTQ calibration time on SmolLM2 against the time from a new
process's start to its first compiled output after ``qcompiler.load``.

Calibrates SmolLM2-135M with ``w4a16-gptq`` (``--calib`` windows of 512 tokens), saves the state,
then for each target starts a new Python process that loads the model and the state, compiles and
runs one prompt, timed from just before the process is spawned (interpreter start and imports
included); twice per target, the first with empty compile caches (``TORCHINDUCTOR_CACHE_DIR`` a
new folder, the exported ONNX files kept under ``$QCOMPILE_CACHE/onnx`` deleted), the second with
what the first left there (a second process on the same machine).

    python benchmarks/experiments/saved_state_first_output.py [--calib 32] [--targets reference auto inductor]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import qcompiler
from qcompiler.bundled import zoo
from qcompiler.runtimes.disk_cache import cache_folder

CHILD = """
import sys, time
import torch, qcompiler
from qcompiler.bundled import zoo
model, tok = zoo.load_smollm2()
qcompiler.load(model, sys.argv[1])
loaded = time.time()
fast = torch.compile(model, backend="qcompile", options={"recipe": "w4a16-gptq", "target": sys.argv[2]})
with torch.no_grad():
    out = fast(input_ids=tok("The capital of France is", return_tensors="pt").input_ids).logits
print(loaded, time.time(), repr(tok.decode(out[0, -1].argmax())))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--targets", nargs="+", default=["reference", "auto", "inductor"])
    args = ap.parse_args()
    model, tok = zoo.load_smollm2()
    calib, _ = zoo.lm_windows(zoo.wiki_token_ids(tok, "smollm2"), 512, args.calib, 0)
    start = time.perf_counter()
    qcompiler.calibrate(model, [w[None] for w in calib], recipe="w4a16-gptq", progress=False)
    seconds = time.perf_counter() - start
    folder = tempfile.mkdtemp()
    qcompiler.save(model, folder, recipe="w4a16-gptq")
    print(f"w4a16-gptq calibration on {args.calib} windows: {seconds:.1f} s", flush=True)
    for target in args.targets:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp()}
        shutil.rmtree(cache_folder("onnx"))
        for cache in ("empty", "warm"):
            t0 = time.time()
            run = subprocess.run([sys.executable, "-c", CHILD, folder, target], capture_output=True, text=True,
                                 check=True, env=env)
            loaded, done, token = run.stdout.strip().splitlines()[-1].split(" ", 2)
            first = float(done) - t0
            print(f"target {target}, compile cache {cache}: state loaded {float(loaded) - t0:.1f} s after spawn, "
                  f"first output {first:.1f} s ({100 * first / seconds:.0f}% of calibration); next token {token}",
                  flush=True)


if __name__ == "__main__":
    main()
