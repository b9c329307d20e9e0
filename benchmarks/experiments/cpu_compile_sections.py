"""Where the first ``generate()`` of a compiled SmolLM2-135M spends its time and memory on the CPU.

Compiles ``model.forward`` with the qcompile backend (``--recipe``, default w8a8; ``dynamic=True``
unless ``--static``) and runs ``generate()`` at a 61-token prompt (1 token, then 8) and a 127-token
prompt; prints, per call, its wall time, the time inside each lowering step (torch.onnx.export,
onnxscript's optimizer, tied-weight sharing, the whole export, the ORT session, the backend) and
the process's resident / peak memory before and after each step. ``--decode`` then splits one
64-token ``generate()`` into the time inside ONNX Runtime's runs and the rest. Use a cold cache
(``QCOMPILE_CACHE=$(mktemp -d)``, with the converted model copied in) to see a first compile.

    python benchmarks/experiments/cpu_compile_sections.py [--recipe w8a8] [--static] [--decode]
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from qcompiler.bundled import zoo
from qcompiler.api import backend
from qcompiler.lowering import onnx as qonnx, onnx_fusions, ort
from qcompiler.runtimes import ort_session


def memory() -> str:
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return " ".join(f"{k}={int(v.split()[0]) / 1e6:.2f}GB" for k, v in fields.items())


def timed(times: dict, owner, name: str, label: str, log: list) -> None:
    """Wrap ``owner.name`` so its calls add their seconds to ``times[label]`` and log memory."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        log.append(f"  > {label}: {memory()}")
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[label] = times.get(label, 0.0) + time.perf_counter() - t
            log.append(f"  < {label}: {memory()}")
    setattr(owner, name, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="w8a8")
    parser.add_argument("--static", action="store_true", help="compile without dynamic=True")
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times, log = {}, []
    for owner, name, label in [(qonnx.torch.onnx, "export", "torch.onnx.export"),
                               (onnx_fusions, "optimize", "onnxscript optimizer"),
                               (qonnx, "share_tied", "share_tied"), (ort, "_exported", "export total"),
                               (ort, "OrtSession", "ORT session"), (backend.CompiledGraph, "_build", "backend")]:
        timed(times, owner, name, label, log)
    model, tok = zoo.load_smollm2()
    ids = zoo.wiki_token_ids(tok, "smollm2")[-4096:].unsqueeze(0)
    print("loaded", memory())
    model.forward = torch.compile(model.forward, backend="qcompile", options={"recipe": args.recipe},
                                  dynamic=None if args.static else True)

    def generate(length: int, new: int):
        p = ids[:, :length]
        with torch.no_grad():
            return model.generate(input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False)

    for length, new in ((61, 1), (61, 8), (127, 1)):
        t = time.perf_counter()
        generate(length, new)
        print(f"prompt {length}, {new} new: {time.perf_counter() - t:.1f} s",
              {k: round(v, 1) for k, v in times.items()})
        print("\n".join(log))
        times.clear()
        log.clear()
    if args.decode:
        inside = {"s": 0.0, "runs": 0}
        run = ort_session.OrtSession.__call__

        def counted(self, *tensors):
            t = time.perf_counter()
            try:
                return run(self, *tensors)
            finally:
                inside["s"] += time.perf_counter() - t
                inside["runs"] += 1
        ort_session.OrtSession.__call__ = counted
        t = time.perf_counter()
        generate(61, 64)
        total = time.perf_counter() - t
        print(f"generate 64: {total:.2f} s; inside ONNX Runtime {inside['s']:.2f} s in {inside['runs']} runs "
              f"({1e3 * inside['s'] / max(inside['runs'], 1):.1f} ms each); "
              f"outside {1e3 * (total - inside['s']) / 64:.1f} ms per token")


if __name__ == "__main__":
    main()
